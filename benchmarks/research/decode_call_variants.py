"""What the compiled decode step's attention call costs against the kernel benchmark's: one static layer of the Qwen3-8B
shape (8 KV heads, 32 query heads, head_dim 128) holding `--context` tokens, the decode kernel timed with the lengths
read on the host or on the device (a captured step), with no mask or a static boolean mask of `max_cache_len` columns
(what generate() passes when compiled). Device only:

    python benchmarks/research/decode_call_variants.py --context 131072
"""

import argparse

import torch
import triton

from oscar_hf.kernels.decode_attention import oscar_decode_attention
from oscar_hf.layer import OscarQuantizedLayer
from oscar_hf.quantization import hadamard_rotation


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    torch.manual_seed(0)
    d, kvh, group, ctx, b = 128, 8, 4, args.context, args.batch
    r = hadamard_rotation(d).float()[None]  # one rotation shared by every KV head: (1, D, D)
    layer = OscarQuantizedLayer(r, r, 0.96, 0.92, max_cache_len=ctx + 64)
    for s in range(0, ctx, 8192):
        k = torch.randn(b, kvh, min(8192, ctx - s), d, device="cuda", dtype=torch.bfloat16) * 2
        layer.update(k, k.clone(), return_segments=True)
    query = torch.randn(b, kvh * group, 1, d, device="cuda", dtype=torch.bfloat16)
    mask = torch.zeros(1, 1, 1, ctx + 64, dtype=torch.bool, device="cuda")
    mask[..., :ctx] = True
    held = layer.held_bytes()
    bw_bytes = 2 * 2**30
    src = torch.empty(bw_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    bw = 2 * bw_bytes / (copy_ms * 1e-3)
    del src, dst
    ref = oscar_decode_attention(query, layer, None, None, 1).float()
    rows = []
    for device_lengths in (False, True):
        for m in (None, mask):
            out = oscar_decode_attention(query, layer, m, None, 1, device_lengths=device_lengths).float()
            err = ((out - ref).norm() / ref.norm()).item()
            us = 1e3 * triton.testing.do_bench(
                lambda m=m, dl=device_lengths: oscar_decode_attention(query, layer, m, None, 1, device_lengths=dl),
                warmup=50, rep=400, return_mode="median")
            rows.append((device_lengths, m is not None, us, held / (us * 1e-6) / bw, err))
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s; layer holds {held / 2**20:.1f} MiB; context {ctx}, batch {b}")
    print("| lengths | mask | us/call | of copy BW | rel. diff vs host/no mask |")
    print("|---|---|---|---|---|")
    for dl, has_mask, us, frac, err in rows:
        print(f"| {'device' if dl else 'host'} | {'bool' if has_mask else 'none'} | {us:.1f} | {100 * frac:.0f}% | "
              f"{err:.1e} |")


if __name__ == "__main__":
    main()

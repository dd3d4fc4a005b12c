"""OscarQuantizedCache and oscar-calibrate with a model split over two devices (accelerate's `device_map`).

    python benchmarks/multi_gpu.py .assets/oscar-ref-code-qwen3                        # cuda:0 + cuda:1
    python benchmarks/multi_gpu.py ../shared/models/oscar-ref-code-qwen3 --devices cpu,cpu --prompt-tokens 256 \
        --new-tokens 16 --calib-tokens 1024                                                # CPU dry run

Checks, each printed as a row of a table and all required for exit status 0:
- greedy `generate()` with a hadamard OscarQuantizedCache (quantizing: default 64/256 windows under a longer prompt)
  gives the same tokens on the split model as on one device;
- every quantized layer holds its storage on the device of its decoder layer;
- `calibrate()` on the split model gives the same covariance spectra and clip ratios as on one device, and so does
  the `oscar-calibrate` command with `--device-map balanced`.
The layers are split half and half with an explicit `device_map` (the reference model is small enough that
`device_map="auto"` would put it on one GPU); `--auto` uses `device_map="auto"` with `max_memory` capping each GPU at
a little over half the model instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import oscar_hf
from oscar_hf import OscarQuantizedCache, OscarRotations, cache_keyword
from oscar_hf.calibrate.cli import main as cli_main
from oscar_hf.calibrate.core import calibrate


def split_device_map(config, devices: list[str]) -> dict[str, str]:
    """First half of the decoder layers (and the embeddings) on devices[0], the rest (and the head) on devices[1]."""
    n = config.num_hidden_layers
    first, second = devices
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": second, "lm_head": second}
    device_map.update({f"model.layers.{i}": first if i < n // 2 else second for i in range(n)})
    if getattr(config, "tie_word_embeddings", False):
        # Tied weights live once; accelerate moves the head's input to wherever the shared weight is.
        device_map["lm_head"] = first
    return device_map


def load(path: str, dtype, device_map) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=device_map, attn_implementation=oscar_hf.OSCAR_ATTENTION
    ).eval()


def tokens_for(path: str, vocab_size: int, n: int, offset: int) -> torch.Tensor:
    """Held-out tokens of the reference model when it ships them, else random ids."""
    held = Path(path) / "heldout_tokens.npy"
    if held.exists():
        ids = np.load(held, mmap_mode="r", allow_pickle=False)
        return torch.from_numpy(np.asarray(ids[offset : offset + n], dtype=np.int64))
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(offset))


@torch.no_grad()
def greedy(
    model, prompt: torch.Tensor, new_tokens: int, input_device
) -> tuple[torch.Tensor, OscarQuantizedCache, float]:
    cache = OscarQuantizedCache(model.config, method="hadamard")
    start = time.perf_counter()
    out = model.generate(
        prompt.to(input_device), **{cache_keyword(model): cache}, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False,
    )
    return out[:, prompt.shape[-1] :].cpu(), cache, time.perf_counter() - start


def layer_devices(model, cache: OscarQuantizedCache) -> list[tuple[int, str, str]]:
    """(layer, the decoder layer's device, the devices its cache storage is on)."""
    rows = []
    for idx, layer in enumerate(cache.layers):
        if not getattr(layer, "is_initialized", False) or not hasattr(layer, "sink_keys"):
            continue
        module_device = str(model.model.layers[idx].self_attn.k_proj.weight.device)
        storage = {str(getattr(layer, name).device) for name in layer._all_tensors()}
        storage |= {str(r.device) for r in (layer.k_rotation, layer.v_rotation) if r is not None}
        rows.append((idx, module_device, ",".join(sorted(storage))))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="path of the model (the reference model, e.g. .assets/oscar-ref-code-qwen3)")
    p.add_argument("--devices", default="cuda:0,cuda:1", help="two devices, comma-separated (cpu,cpu: dry run)")
    p.add_argument("--auto", action="store_true", help='device_map="auto" with max_memory instead of an explicit map')
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--calib-seq-len", type=int, default=1024)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    devices = args.devices.split(",")
    if len(devices) != 2:
        p.error("--devices takes exactly two devices")
    dtype = getattr(torch, args.dtype)
    config = AutoConfig.from_pretrained(args.model)
    if args.auto:
        if not all(d.startswith("cuda") for d in devices):
            p.error("--auto needs two CUDA devices")
        probe = AutoModelForCausalLM.from_config(config, dtype=dtype)
        size = sum(t.numel() * t.element_size() for t in probe.parameters())
        del probe
        cap = int(size * 0.6)
        device_map, max_memory = "auto", {int(d.split(":")[1]): cap for d in devices}
    else:
        device_map, max_memory = split_device_map(config, devices), None

    single = load(args.model, dtype, devices[0])
    if max_memory is None:
        split = load(args.model, dtype, device_map)
    else:
        split = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=dtype, device_map=device_map, max_memory=max_memory,
            attn_implementation=oscar_hf.OSCAR_ATTENTION,
        ).eval()
    placed = sorted({str(prm.device) for prm in split.parameters()})
    print(f"devices: {args.devices} ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}), "
          f"split model parameters on {placed}, torch {torch.__version__}, dtype {args.dtype}")

    rows, ok = [], True

    def check(name, passed, detail):
        nonlocal ok
        ok &= bool(passed)
        rows.append((name, "ok" if passed else "FAIL", detail))

    prompt = torch.stack([tokens_for(args.model, config.vocab_size, args.prompt_tokens, 1_048_576 + i * 65_536)
                          for i in range(args.batch)])
    ref_tokens, ref_cache, t_single = greedy(single, prompt, args.new_tokens, devices[0])
    got_tokens, cache, t_split = greedy(split, prompt, args.new_tokens, split.model.embed_tokens.weight.device)
    layer0 = cache.quantized_layers()[0]
    match = (got_tokens == ref_tokens).float().mean().item()
    check("greedy tokens split == single", match == 1.0,
          f"{match:.1%} of {ref_tokens.numel()} tokens equal; body {layer0.body_len} tokens 2-bit; "
          f"{t_single:.1f} s single, {t_split:.1f} s split")
    placement = layer_devices(split, cache)
    wrong = [(i, m, s) for i, m, s in placement if s != m]
    spread = sorted({m for _, m, _ in placement})
    check("cache storage on its layer's device", not wrong and len(placement) == config.num_hidden_layers,
          f"layers on {spread}" + (f"; mismatched {wrong}" if wrong else ""))
    check("bits per element (split)", abs(cache.kv_bits_per_element() - ref_cache.kv_bits_per_element()) < 1e-9,
          f"{cache.kv_bits_per_element():.3f} split, {ref_cache.kv_bits_per_element():.3f} single")

    calib = tokens_for(args.model, config.vocab_size, args.calib_tokens, 0)
    seq_len = min(args.calib_seq_len, args.calib_tokens // 4)
    # The fitted recipe with clip search: both statistics passes and the held-back search run on the split model
    # (the default Hadamard bundle has no value spectrum to compare).
    kw = dict(seq_len=seq_len, heldout_tokens=seq_len, progress=False, rotation="fitted", fit_clip=True)
    start = time.perf_counter()
    rot_single, _ = calibrate(single, calib, **kw)
    t_cal_single = time.perf_counter() - start
    start = time.perf_counter()
    rot_split, _ = calibrate(split, calib, **kw)
    t_cal_split = time.perf_counter() - start
    spectra = max(
        ((a - b).abs().max() / a.abs().max()).item()
        for a, b in (
            (rot_single.k_eigenvalues, rot_split.k_eigenvalues),
            (rot_single.v_eigenvalues, rot_split.v_eigenvalues),
        )
    )
    clips = torch.equal(rot_single.k_clip_ratios, rot_split.k_clip_ratios) and torch.equal(
        rot_single.v_clip_ratios, rot_split.v_clip_ratios
    )
    # bf16 activations computed on two devices may round differently in a few places; the float64 spectra must agree
    # to well within what a different calibration text would change.
    check("calibration split == single", spectra < 1e-2 and clips,
          f"max rel. spectrum diff {spectra:.2e}, clip ratios {'equal' if clips else 'differ'}; "
          f"{args.calib_tokens} tokens: {t_cal_single:.1f} s single, {t_cal_split:.1f} s split")

    # The command line, splitting the model itself: accelerate's "balanced" map spreads even a small model over
    # every visible GPU (on a CPU-only machine it is one device).
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "tokens.npy", calib.numpy())
        cli_args = ["--model", args.model, "--data", str(Path(tmp) / "tokens.npy"), "--num-tokens", str(calib.numel()),
                    "--output", str(Path(tmp) / "bundle"), "--seq-len", str(seq_len), "--heldout-tokens",
                    str(seq_len), "--weight-tokens", "-1", "--dtype", args.dtype, "--device-map", "balanced",
                    "--rotation", "fitted", "--clip-fit", "--no-progress"]
        with contextlib.redirect_stdout(io.StringIO()) as log:
            status = cli_main(cli_args)
        rot_cli = OscarRotations.from_pretrained(Path(tmp) / "bundle")
    cli_device = next((line.split("(device ")[-1].rstrip(")") for line in log.getvalue().splitlines()
                       if "(device " in line), "?")
    cli_spectra = max(
        ((a - b).abs().max() / a.abs().max()).item()
        for a, b in (
            (rot_single.k_eigenvalues, rot_cli.k_eigenvalues),
            (rot_single.v_eigenvalues, rot_cli.v_eigenvalues),
        )
    )
    check("oscar-calibrate --device-map balanced", status == 0 and cli_spectra < 1e-2,
          f"exit {status}, max rel. spectrum diff to single {cli_spectra:.2e}, first device {cli_device}")

    width = max(len(r[0]) for r in rows)
    print(f"\n| {'check':<{width}} | result | detail |\n|{'-' * (width + 2)}|--------|--------|")
    for name, result, detail in rows:
        print(f"| {name:<{width}} | {result:<6} | {detail} |")
    print("\nper-layer placement: " + ", ".join(f"{i}:{m}" for i, m, _ in placement))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"devices": args.devices, "rows": rows, "placement": placement}, indent=1)
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

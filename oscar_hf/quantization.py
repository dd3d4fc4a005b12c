"""The reference quantization math: the one source of truth that every kernel is tested against.

Everything here works on *rows*: the last dimension is one (token, head) vector of `head_dim` values, already
rotated. A row is clipped to a quantile of its absolute values, then quantized to 2 bits with an asymmetric
min-max grid (4 levels), and stored as packed codes plus a per-row `scale` and `offset` (the value of code 0):

    value ~= code * scale + offset,  code in {0, 1, 2, 3}

Packing layout ("planar"): byte `i` of a row (0 <= i < head_dim / 4) holds the codes of channels
`i`, `i + head_dim/4`, `i + head_dim/2` and `i + 3*head_dim/4` in bits 0-1, 2-3, 4-5 and 6-7. A kernel that loads
the `head_dim / 4` bytes of a row and shifts them by 0, 2, 4, 6 gets four contiguous quarters of the row, so it never
has to interleave registers.

Value codes in the cache's 2-bit body are stored *token-pair interleaved* (`write_token_pairs` / `read_token_pairs`):
byte `i` of token `t` sits at `(t // 2) * 2 * (head_dim / 4) + 2 * i + t % 2` of a head's code plane, so one 16-bit
read gives the same byte of two consecutive tokens. The value product reduces over tokens, and that is the operand
order the decode kernel's tensor-core products want. Key codes stay token rows (the key product reduces over
channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CODES_PER_BYTE = 4
NUM_LEVELS = 4  # 2 bits
# Scale and offset are kept in float16: 11 bits of mantissa keep the grid accurate, and 2 x 16 bits per 128-value row
# is the 0.25 bit/element overhead the 2.25 bits/element budget allows.
PARAM_DTYPE = torch.float16
_FP16_MAX = torch.finfo(torch.float16).max


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of size `n` (a power of two), entries +-1/sqrt(n)."""
    if n < 1 or n & (n - 1):
        raise ValueError(
            f"A Hadamard rotation needs a power-of-two head_dim, got {n}. "
            "Supported head_dim values are 64, 128, 256 (any power of two)."
        )
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % f for f in range(2, math.isqrt(n) + 1))


def _paley_hadamard(order: int) -> torch.Tensor:
    """The +-1 Hadamard matrix of `order = q + 1`, `q` a prime with `q % 4 == 3` (Paley's first construction)."""
    q = order - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    jacobsthal = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(order, order, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + torch.eye(order, dtype=torch.float64)


def hadamard_rotation(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An orthonormal rotation of size `n` that spreads outliers as a Hadamard matrix does, for any `n`.

    A power of two gets the Sylvester matrix (`hadamard_matrix`). Otherwise `n = (q + 1) * 2**k` with `q` a prime,
    `q % 4 == 3`, gets the Kronecker product of a Paley matrix and a Sylvester matrix, itself a Hadamard matrix
    (80 = 20 * 4, 96 = 12 * 8, 72, 120 = 60 * 2, 160, 192, ...). Any other size gets a block-diagonal Hadamard over
    the largest power-of-two block dividing `n`, which mixes only within blocks: a weaker rotation, still orthogonal.
    """
    if n < 1:
        raise ValueError(f"A rotation needs a positive size, got {n}.")
    if not n & (n - 1):
        return hadamard_matrix(n, dtype)
    power = n & -n  # the largest power of two dividing n
    k = power
    while k >= 1:
        m = n // k
        if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            h = torch.kron(_paley_hadamard(m), hadamard_matrix(k) * math.sqrt(k))
            return (h / math.sqrt(n)).to(dtype)
        k //= 2
    return torch.block_diag(*[hadamard_matrix(power)] * (n // power)).to(dtype)


def bit_reversal_permutation(n: int) -> torch.Tensor:
    """Indices `0..n-1` in bit-reversed order (`n` a power of two): spreads consecutive indices far apart."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"A bit-reversal permutation needs a power-of-two size, got {n}.")
    bits = n.bit_length() - 1
    return torch.tensor([int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(n)], dtype=torch.long)


def clip_threshold(rows: torch.Tensor, clip_ratio: float | torch.Tensor) -> torch.Tensor:
    """The `clip_ratio` quantile of `|row|` for each row (linear interpolation, as `torch.quantile`).

    Written with an explicit sort so that a kernel can reproduce it exactly: sort `|row|`, then interpolate between
    the two order statistics around position `clip_ratio * (head_dim - 1)`. `clip_ratio` may be a scalar or a tensor
    broadcastable to `rows.shape[:-1]` (one ratio per head, say).
    """
    n = rows.shape[-1]
    ratio = torch.as_tensor(clip_ratio, dtype=torch.float32, device=rows.device)
    ratio = ratio.expand(rows.shape[:-1])
    pos = ratio * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo.to(pos.dtype)
    sorted_abs = rows.abs().float().sort(dim=-1).values
    lo_val = sorted_abs.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    hi_val = sorted_abs.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    return lo_val + frac * (hi_val - lo_val)


@dataclass
class QuantizedRows:
    """Packed 2-bit rows: `codes` uint8 `[..., head_dim // 4]`, `scale` and `offset` float16 `[...]`."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor


def error_feedback_factor(metric: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The factor `quantize_rows(..., feedback=)` takes for a metric `[..., D, D]` (symmetric PSD, in the stored
    rotated space): `U` upper-triangular with `U^T U = (metric + damp * mean(diag) * I)^-1`, float32."""
    m = metric.double()
    m = 0.5 * (m + m.transpose(-1, -2))
    eye = torch.eye(m.shape[-1], dtype=torch.float64, device=m.device)
    m = m + damp * m.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(1e-30) * eye
    return torch.linalg.cholesky(torch.linalg.inv(m), upper=True).float()


@dataclass
class KeyTilt:
    """What the coder needs to weigh each key's error by the queries that will attend to it ("attention tilt").

    For query head g reading a KV head, with query mean `mu_g` and covariance `Sigma_g` (rotated, coding order), the
    queries that attend to a key y (weights `exp(s q . y)`, Gaussian approximation) have mean `m_g = mu_g + s Sigma_g y`
    and second moment `Sigma_g + m_g m_g^T`. The key is coded in the metric `S + W W^T`, `S = sum_g Sigma_g` (its
    factor is the `feedback` argument), `W = [m_1 .. m_G]`: a rank-G correction per row that points the error away
    from the directions this key's queries look along. `maps[g] = t * s * Sigma_g` (t, the tilt strength, is a
    calibration choice) so that `m_g = means[g] + y @ maps[g]`.

    means: `[heads or 1, G, D]`; maps: `[heads or 1, G, D, D]` (symmetric), float32.
    """

    means: torch.Tensor
    maps: torch.Tensor

    def columns(self, rows: torch.Tensor) -> torch.Tensor:
        """`W` for rows `[..., heads, n, D]`: `[..., heads, n, D, G]`."""
        means = self.means.to(rows.device, torch.float32)
        maps = self.maps.to(rows.device, torch.float32)
        w = torch.einsum("...hnd,hgde->...hnge", rows.float(), maps) + means.unsqueeze(-3)
        return w.transpose(-1, -2)


def quantize_rows(
    rows: torch.Tensor,
    clip_ratio: float | torch.Tensor = 1.0,
    feedback: torch.Tensor | None = None,
    tilt: KeyTilt | None = None,
) -> QuantizedRows:
    """Clip each row to its `clip_ratio` quantile of `|x|`, then quantize it to 2 bits (asymmetric min-max).

    Rows are independent: a row holding NaN or Inf gets a non-finite scale and never touches any other row.
    `clip_ratio=1.0` clips nothing (the quantile is the max).

    `feedback` (`[heads or 1, D, D]` from `error_feedback_factor`, for rows `[..., heads, n, D]`) picks the codes with
    error feedback instead of rounding each value alone: channels are coded in order and each one's rounding error is
    pushed onto the channels not yet coded (the GPTQ/OBQ update), so that the error left in the row is small in the
    metric -- for keys the query covariance, which weighs errors by how much they move attention scores. The grid
    (scale, offset) is the same; only the choice of codes changes.

    `tilt` (keys only, with `feedback` the factor of the tilt's base metric S) adds each row's rank-G correction
    `W W^T` to the metric (`KeyTilt`); the feedback then follows `S + W W^T` exactly, at O(D^2 G) per row.
    """
    if rows.shape[-1] % CODES_PER_BYTE:
        raise ValueError(f"head_dim must be a multiple of {CODES_PER_BYTE} to pack 2-bit codes, got {rows.shape[-1]}.")
    if tilt is not None and feedback is None:
        raise ValueError("A key tilt refines error feedback: pass the factor of its base metric as `feedback`.")
    x = rows.float()
    threshold = clip_threshold(x, clip_ratio).unsqueeze(-1)
    x = torch.minimum(torch.maximum(x, -threshold), threshold)
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    # Scale and offset are rounded to their storage dtype first and the codes chosen against the rounded grid, so
    # that dequantization uses exactly the grid the codes were picked on.
    lo = lo.clamp(-_FP16_MAX, _FP16_MAX).to(PARAM_DTYPE).float()
    scale = ((hi - lo) / (NUM_LEVELS - 1)).clamp(max=_FP16_MAX).to(PARAM_DTYPE).float()
    # A constant row has a null range: any code decodes to the offset, so the division is guarded, not skipped.
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if feedback is None:
        codes = torch.floor((x - lo) / safe_scale + 0.5).clamp(0, NUM_LEVELS - 1)
    else:
        codes = _codes_with_feedback(rows.float(), lo, safe_scale, feedback.to(rows.device, torch.float32), tilt)
    codes = torch.nan_to_num(codes, nan=0.0).to(torch.uint8)
    return QuantizedRows(pack_codes(codes), scale.squeeze(-1).to(PARAM_DTYPE), lo.squeeze(-1).to(PARAM_DTYPE))


def _codes_with_feedback(
    x: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, factor: torch.Tensor, tilt: KeyTilt | None = None
) -> torch.Tensor:
    """Sequential rounding of `x` `[..., H, n, D]` on the grid `lo + scale * {0..3}` with GPTQ error feedback.

    Without `tilt` the metric is `S`, `factor` the upper Cholesky factor U of `S^-1`: coding channel j with error e
    moves the channels after it by `-e * U[j, j+1:] / U[j, j]`. With `tilt` the metric of a row is `S + W W^T`
    (W `[D, G]`, `KeyTilt.columns`); the same move uses the inverse of that metric restricted to the channels not yet
    coded, kept through Woodbury's identity as `P - Z C Z^T` (P the restricted `S^-1`, whose column j is
    `U[j, j] * U[j, :]`; `Z = P W` and `C = (I + W^T Z)^-1`). When channel j leaves the uncoded set, Z loses
    `U[j, :]^T z_j` and C gains `C z_j z_j^T C / (P[j, j] - z_j^T C z_j)` (Sherman-Morrison). Two facts keep this at
    O(D G) per channel with no G x G matrix: Z's row j is then `U[j, j] V[j]` (V = U W, fixed), and `Y = Z C` follows
    the same steps as `Y -= move (C z_j)^T / denom`, with `C z_j = Y[j]` (C is symmetric) and `move` the column
    `P[:, j] - Z C z_j` that moves the row.

    Every float32 operation is elementwise, every sum is taken term by term in index order and no product is fused
    into an add, so that the Triton write kernel (`oscar_hf.kernels.quantize`) reproduces the codes bit for bit.
    """
    x = x.clone()
    d = x.shape[-1]
    factor = factor.unsqueeze(-3)  # [H, 1, D, D]: broadcast over the tokens of each head
    codes = torch.empty_like(x)
    if tilt is not None:
        v, y = _tilt_state(x, factor, tilt)
        g = v.shape[-1]
    for j in range(d):
        q = torch.floor((x[..., j : j + 1] - lo) / scale + 0.5).clamp(0, NUM_LEVELS - 1)
        codes[..., j : j + 1] = q
        if j + 1 == d:
            break
        err = x[..., j : j + 1] - (q * scale + lo)
        u_jj = factor[..., j, j : j + 1]
        u = factor[..., j, j + 1 :] / u_jj  # S^-1's column j over its diagonal, on the channels after j
        if tilt is None:
            x[..., j + 1 :] -= err * u
            continue
        z_j = u_jj * v[..., j, :]  # [..., G]
        cz = y[..., j, :]
        zcz = torch.zeros_like(err)
        for b in range(g):
            zcz = zcz + z_j[..., b : b + 1] * cz[..., b : b + 1]
        p_jj = u_jj * u_jj
        denom = p_jj - zcz  # the restricted inverse's diagonal at j: P[j, j] - z_j^T C z_j
        zc = torch.zeros_like(x[..., j + 1 :])
        for b in range(g):
            zc = zc + y[..., j + 1 :, b] * z_j[..., b : b + 1]
        move = p_jj * u - zc  # its column j on the channels after j: P[:, j] - Z C z_j
        x[..., j + 1 :] -= (err / denom) * move
        y[..., j + 1 :, :] -= move.unsqueeze(-1) * (cz / denom).unsqueeze(-2)
    return codes


def _tilt_state(x: torch.Tensor, factor: torch.Tensor, tilt: KeyTilt) -> tuple[torch.Tensor, torch.Tensor]:
    """`V = U W` and `Y = Z C` `[..., H, n, D, G]` at the start (`Z = S^-1 W = U^T V`, `C = (I + V^T V)^-1`) for the
    rows `x` and the factor U `[H, 1, D, D]`, from `W = means + x maps`: each sum term by term in index order (the
    kernel's order), the inverse by sweeping the pivots in order."""
    d = x.shape[-1]
    means = tilt.means.to(x.device, x.dtype).transpose(-1, -2).unsqueeze(-3)  # [H, 1, D, G]
    maps = tilt.maps.to(x.device, x.dtype).transpose(-2, -3).unsqueeze(-4)  # [H, 1, D(i), G, D(e)]
    g = means.shape[-1]
    w = means
    for i in range(d):  # W[e, g] = means[g, e] + sum_i x_i maps[g, i, e]
        w = w + x[..., i, None, None] * maps[..., i, :, :].transpose(-1, -2)
    v = torch.zeros_like(w)
    for i in range(d):  # V[k] = sum_i U[k, i] W[i]
        v = v + factor[..., :, i, None] * w[..., i, None, :]
    z = torch.zeros_like(w)
    a = torch.eye(g, dtype=x.dtype, device=x.device).expand(*w.shape[:-2], g, g)
    for i in range(d):  # Z[k] = sum_i U[i, k] V[i]; W^T Z = V^T V
        z = z + factor[..., i, :, None] * v[..., i, None, :]
        a = a + v[..., i, :, None] * v[..., i, None, :]
    c = _sweep_inverse(a)
    y = torch.zeros_like(z)
    for b in range(g):
        y = y + z[..., :, b : b + 1] * c[..., b, None, :]
    return v, y


def _sweep_inverse(a: torch.Tensor) -> torch.Tensor:
    """The inverse of symmetric positive definite `a` `[..., G, G]` (here `I + V^T V`, so no pivoting is needed) by
    the sweep operator on each pivot in order, which keeps the result exactly symmetric."""
    g = a.shape[-1]
    idx = torch.arange(g, device=a.device)
    for p in range(g):
        piv = a[..., p : p + 1, p : p + 1]
        swept = a - a[..., :, p : p + 1] * a[..., p : p + 1, :] / piv
        on_row, on_col = (idx == p)[:, None], (idx == p)[None, :]
        swept = torch.where(on_row | on_col, a / piv, swept)
        a = torch.where(on_row & on_col, -1.0 / piv, swept)
    return -a


def metric_from_factor(feedback: torch.Tensor) -> torch.Tensor:
    """The metric S `[heads or 1, D, D]` float32 whose error-feedback factor is `feedback` (`U^T U = S^-1`)."""
    u = feedback.double()
    return torch.linalg.inv(u.mT @ u).float()


def refit_grid(
    rows: torch.Tensor, q: QuantizedRows, metric: torch.Tensor, tilt: KeyTilt | None = None
) -> QuantizedRows:
    """Each row's scale and offset refitted by least squares in its coding metric, the codes kept.

    `quantize_rows(..., feedback=)` picks codes on the min-max grid of the clipped row; the grid is then no longer the
    best one for those codes in the metric that picked them. For a row x (`rows`, rotated and unclipped) with codes c,
    this solves the 2 x 2 normal equations of `min_{s, z} (x - s c - z)^T M (x - s c - z)`, M the row's metric:
    `metric` S (`metric_from_factor` of the feedback factor), plus `W W^T` with a key `tilt`. A row keeps its old grid
    where the refit, rounded to float16, is not lower in M (a degenerate or non-finite row, or rounding). `rows`
    `[..., heads, n, D]`; `metric` `[heads or 1, D, D]`.
    """
    x = rows.float()
    codes = unpack_codes(q.codes).float()
    metric = metric.to(x.device, torch.float32).unsqueeze(-3)  # [H or 1, 1, D, D]
    w = None if tilt is None else tilt.columns(x)  # [..., H, n, D, G]

    def apply(v: torch.Tensor) -> torch.Tensor:  # M v, row by row
        out = (v.unsqueeze(-2) @ metric).squeeze(-2)
        if w is not None:
            out = out + (w @ (v.unsqueeze(-2) @ w).mT).squeeze(-1)
        return out

    ones = torch.ones_like(codes)
    mc, m1 = apply(codes), apply(ones)
    a11, a12, a22 = (codes * mc).sum(-1), mc.sum(-1), m1.sum(-1)
    r1, r2 = (x * mc).sum(-1), (x * m1).sum(-1)
    det = a11 * a22 - a12 * a12
    scale = ((a22 * r1 - a12 * r2) / det).to(PARAM_DTYPE)
    offset = ((a11 * r2 - a12 * r1) / det).to(PARAM_DTYPE)

    def error(sc: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        e = x - (codes * sc.float().unsqueeze(-1) + off.float().unsqueeze(-1))
        return (e * apply(e)).sum(-1)

    keep = torch.isfinite(scale) & torch.isfinite(offset) & (scale > 0) & (det > 0)
    keep &= error(scale, offset) < error(q.scale, q.offset)
    return QuantizedRows(q.codes, torch.where(keep, scale, q.scale), torch.where(keep, offset, q.offset))


def dequantize_rows(q: QuantizedRows, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_rows` (up to the quantization error): `code * scale + offset`."""
    codes = unpack_codes(q.codes).float()
    return (codes * q.scale.float().unsqueeze(-1) + q.offset.float().unsqueeze(-1)).to(dtype)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """`[..., head_dim]` codes in 0..3 -> `[..., head_dim // 4]` bytes, planar layout (see the module docstring)."""
    quarters = codes.to(torch.uint8).unflatten(-1, (CODES_PER_BYTE, -1))  # [..., 4, head_dim // 4]
    packed = quarters[..., 0, :]
    for s in range(1, CODES_PER_BYTE):
        packed = packed | (quarters[..., s, :] << (2 * s))
    return packed


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """`[..., head_dim // 4]` bytes -> `[..., head_dim]` codes in 0..3 (uint8)."""
    quarters = [(packed >> (2 * s)) & 0x3 for s in range(CODES_PER_BYTE)]
    return torch.cat(quarters, dim=-1)


def rotate(rows: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """`rows @ rotation` in float32. `rows` is `[batch, heads, seq, head_dim]`; `rotation` is `[head_dim, head_dim]`
    (one per layer) or `[heads, head_dim, head_dim]` (one per KV head)."""
    r = rotation.to(device=rows.device, dtype=torch.float32)
    if r.dim() == 3:
        r = r.unsqueeze(0)  # [1, heads, D, D] broadcasts over the batch
    return torch.matmul(rows.float(), r)


def unrotate(rows: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """`rows @ rotation^T` in float32: undoes `rotate` (rotations are orthogonal)."""
    r = rotation.to(device=rows.device, dtype=torch.float32)
    if r.dim() == 3:
        r = r.unsqueeze(0)
    return torch.matmul(rows.float(), r.transpose(-1, -2))


def rotate_new_states(
    keys: torch.Tensor,
    values: torch.Tensor,
    k_rotation: torch.Tensor | None,
    v_rotation: torch.Tensor | None,
    k_mean_rotated: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New key and value states as a layer stores them, in `dtype`: keys `keys @ R_K - mean` and values `values @ R_V`,
    both in float32 and rounded once (a missing rotation or mean is skipped). `kernels.append.append_window` computes
    the same rows inside its write kernel; this is its reference."""
    if k_rotation is not None:
        keys = rotate(keys, k_rotation)
    if k_mean_rotated is not None:
        keys = keys.float() - k_mean_rotated
    if v_rotation is not None:
        values = rotate(values, v_rotation)
    return keys.to(dtype), values.to(dtype)


def _pair_view(plane: torch.Tensor) -> torch.Tensor:
    """`[..., capacity, B]` codes stored token-pair interleaved -> a `[..., capacity / 2, 2, B]` view indexed
    (pair, token parity, byte)."""
    *lead, cap, nbytes = plane.shape
    if cap % 2:
        raise ValueError(f"A token-pair interleaved code plane needs an even capacity, got {cap}.")
    return plane.view(*lead, cap // 2, nbytes, 2).transpose(-1, -2)


def write_token_pairs(plane: torch.Tensor, codes: torch.Tensor, start: int) -> None:
    """Store `codes` `[..., n, B]` (token rows) as tokens `start .. start + n - 1` of the token-pair interleaved
    `plane` `[..., capacity, B]` (see the module docstring); `start` may be odd."""
    n = codes.shape[-2]
    if start < 0 or start + n > plane.shape[-2]:
        raise ValueError(f"Tokens {start}..{start + n} do not fit a code plane of {plane.shape[-2]} tokens.")
    t = torch.arange(start, start + n, device=plane.device)
    _pair_view(plane)[..., t // 2, t % 2, :] = codes


def read_token_pairs(plane: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """Tokens `start .. start + n - 1` of the token-pair interleaved `plane` as token rows `[..., n, B]` (a new
    tensor)."""
    t = torch.arange(start, start + n, device=plane.device)
    return _pair_view(plane)[..., t // 2, t % 2, :]

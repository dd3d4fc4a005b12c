"""Calibration: statistics against an independent computation, the rotation construction, the end-to-end command,
and (slow) the decode-mode quality of a bundle made by the command on the reference model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, Qwen3Config, Qwen3ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import oscar_hf  # noqa: F401
from oscar_hf import OscarQuantizedCache, OscarRotations
from oscar_hf.calibrate.cli import main as calibrate_main
from oscar_hf.calibrate.core import calibrate
from oscar_hf.calibrate.data import load_calibration_tokens
from oscar_hf.calibrate.fit import rotation_from_covariance
from oscar_hf.calibrate.statistics import StatisticsCollector, capturing
from oscar_hf.quantization import bit_reversal_permutation, hadamard_matrix

SHARED = Path(os.environ.get("OSCAR_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared"))
REF_MODEL = SHARED / "models" / "oscar-ref-code-qwen3"
CALIBRATION_END = 1_048_576  # tokens before this index may be used for calibration, the rest only for evaluation


def tiny_model(layers=2, heads=4, kv_heads=2, head_dim=32, seed=0):
    torch.manual_seed(seed)
    config = Qwen3Config(
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        hidden_size=64, intermediate_size=128, vocab_size=97, max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(config).eval()


def _recorded_activations(model, ids):
    """Post-RoPE Q/K/V per layer, recorded by a separate attention function (the independent reference)."""
    seen = {}

    def record(module, query, key, value, *args, **kwargs):
        seen.setdefault(module.layer_idx, []).append((query.double(), key.double(), value.double()))
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("test_record", record)
    model.set_attn_implementation("test_record")
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None], use_cache=False)
    model.set_attn_implementation("sdpa")
    return seen


def test_streamed_statistics_match_direct_computation():
    model = tiny_model()
    ids = torch.randint(0, 97, (3, 40))
    seen = _recorded_activations(model, ids)
    collector = StatisticsCollector([0, 1], num_kv_heads=2, head_dim=32)
    with capturing(model, collector), torch.no_grad():
        for row in ids:
            model(input_ids=row[None], use_cache=False)
        collector.start_value_pass()
        for row in ids:
            model(input_ids=row[None], use_cache=False)
    assert model.config._attn_implementation == "sdpa"  # restored
    for layer in (0, 1):
        q = torch.cat([a[0][0] for a in seen[layer]], dim=1)  # [Hq, N, D]
        k = torch.cat([a[1][0] for a in seen[layer]], dim=1)  # [Hkv, N, D]
        v = torch.cat([a[2][0] for a in seen[layer]], dim=1)
        n = q.shape[1]
        for h in range(2):
            qg = q[2 * h : 2 * h + 2].reshape(-1, 32)  # query heads 2h, 2h+1 read KV head h
            cov = qg.T @ qg / n
            torch.testing.assert_close(collector.query_covariance()[layer, h], cov)
            w = torch.einsum("td,de,te->t", k[h], cov, k[h])
            w = w / w.mean()
            torch.testing.assert_close(collector.value_covariance()[layer, h], (v[h].T * w) @ v[h] / n)


def test_rotation_is_eigenvectors_times_hadamard_times_bit_reversal():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 16, generator=g, dtype=torch.float64)
    cov = a.T @ a
    rot, evals = rotation_from_covariance(cov)
    assert (evals.diff() >= 0).all()
    torch.testing.assert_close(rot.double().T @ rot.double(), torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)
    # Undo P_br and H: the columns must be eigenvectors of cov with the returned eigenvalues (ascending).
    inverse = torch.argsort(bit_reversal_permutation(16))
    u = rot.double()[:, inverse] @ hadamard_matrix(16)
    torch.testing.assert_close(cov @ u, u * evals.double(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("grouping, groups", [("layer", 1), ("head", 2)])
def test_calibrate_tiny_model_gives_a_valid_bundle_with_best_held_back_clips(grouping, groups):
    model = tiny_model()
    tokens = torch.randint(0, 97, (2048,))
    rot, report = calibrate(model, tokens, seq_len=256, grouping=grouping, heldout_tokens=512, fit_clip=True,
                            rotation="fitted", progress=False)
    assert rot.method == "oscar" and rot.groups == groups and rot.k_rotations.shape == (2, groups, 32, 32)
    assert report.fit_tokens == 1536 and report.heldout_tokens == 512
    assert set(report.errors) >= {"k_oscar", "k_hadamard", "v_oscar", "v_hadamard"}
    # The fitted clip is the candidate with the smallest held-back error, so it never loses to the default one.
    for kind in ("k", "v"):
        assert all(
            a <= b + 1e-12 for a, b in zip(report.errors[f"{kind}_oscar"], report.errors[f"{kind}_oscar_default_clip"])
        )
    assert rot.metadata["calibration"]["layer_grouping"] == ",".join([grouping] * 2)
    OscarQuantizedCache(config=model.config, rotations=rot)  # accepted by the cache


def test_error_feedback_factors_and_hadamard_rotation_option():
    model = tiny_model()
    tokens = torch.randint(0, 97, (1536,))
    rot, _ = calibrate(model, tokens, seq_len=256, grouping="layer", rotation="hadamard", progress=False)
    h = hadamard_matrix(32).float()
    # Columns are the Hadamard matrix's, reordered by decreasing query-metric weight (error feedback codes those first).
    for layer in range(2):
        r = rot.k_rotations[layer, 0]
        matches = (r.T @ h).abs().isclose(torch.tensor(1.0), atol=1e-5).sum(1)
        assert (matches == 1).all()
    assert rot.k_feedback.shape == (2, 1, 32, 32) and torch.equal(rot.k_feedback, rot.k_feedback.triu())
    assert rot.metadata["calibration"]["rotation"] == "hadamard"
    plain, _ = calibrate(model, tokens, seq_len=256, error_feedback=False, rotation="fitted", progress=False)
    assert plain.k_feedback is None and plain.metadata["calibration"]["error_feedback"].startswith("none")
    with pytest.raises(ValueError, match="rotation"):
        calibrate(model, tokens, seq_len=256, rotation="random", progress=False)


def test_default_bundle_is_hadamard_with_per_head_feedback_and_feedback_beats_plain_hadamard_on_held_back_keys():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2048,))
    rot, _ = calibrate(model, tokens, seq_len=256, progress=False)
    meta = rot.metadata["calibration"]
    assert meta["rotation"] == "hadamard" and meta["layer_grouping"] == "head,head"
    assert meta["statistics"].startswith("one pass") and meta["clip_fit"] == "reference defaults"
    assert rot.groups == 2 and rot.k_feedback.shape == (2, 2, 32, 32) and rot.v_feedback.shape == (2, 2, 32, 32)
    # One factor per KV head: the two heads' query covariances differ, so do their factors.
    assert not torch.allclose(rot.k_feedback[0, 0], rot.k_feedback[0, 1])
    assert rot.k_means is None and meta["key_centering"] == "none"
    torch.testing.assert_close(rot.k_clip_ratios, torch.full((2,), 0.96))
    torch.testing.assert_close(rot.v_clip_ratios, torch.full((2,), 0.96))  # the feedback coding's value clip
    # The summary's comparison: the held-back attention-output error of keys coded with feedback in the query metric is
    # below plain Hadamard rounding at the same clips, layer by layer. The tilt is left out here: its default strength
    # was chosen on the reference model and, on this random model, costs key error (tests/test_key_tilt.py).
    _, report = calibrate(model, tokens, seq_len=256, heldout_tokens=512, key_tilt=0, progress=False)
    assert all(o < h for o, h in zip(report.errors["k_oscar"], report.errors["k_hadamard"])), report.errors


def test_calibration_leaves_model_outputs_unchanged():
    model = tiny_model()
    ids = torch.randint(0, 97, (1, 64))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    collector = StatisticsCollector([0, 1], 2, 32)
    with capturing(model, collector), torch.no_grad():
        during = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(during, before)
    assert collector.query_tokens.tolist() == [64.0, 64.0]


def test_center_keys_stores_each_heads_mean_key():
    model = tiny_model()
    tokens = torch.randint(0, 97, (1536,))
    rot, report = calibrate(model, tokens, seq_len=256, heldout_tokens=512, center_keys=True, progress=False)
    assert rot.k_means.shape == (2, 2, 32) and rot.metadata["calibration"]["key_centering"].startswith("mean key")
    # The stored mean is the mean post-RoPE key of the fitting tokens, per head.
    collector = StatisticsCollector([0, 1], 2, 32)
    with capturing(model, collector), torch.no_grad():
        model(input_ids=tokens[:1024].view(4, 256), use_cache=False)
    torch.testing.assert_close(rot.k_means, collector.key_mean().float(), atol=1e-5, rtol=1e-4)
    assert set(report.errors) >= {"k_oscar", "k_hadamard"}


def test_auto_grouping_records_a_choice_per_layer():
    model = tiny_model(layers=3)
    rot, report = calibrate(model, torch.randint(0, 97, (1536,)), seq_len=256, grouping="auto", heldout_tokens=512,
                            progress=False)
    assert len(report.layer_grouping) == 3 and set(report.layer_grouping) <= {"layer", "head"}
    assert rot.groups == (1 if set(report.layer_grouping) == {"layer"} else 2)


def test_cli_writes_a_loadable_bundle(tmp_path, capsys):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 97, 4096).astype(np.uint16))
    rc = calibrate_main([
        "--model", str(tmp_path / "model"), "--data", str(tmp_path / "tokens.npy"), "--num-tokens", "3072",
        "--output", str(tmp_path / "bundle"), "--seq-len", "256", "--no-progress",
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "tokens: 2816 fitted + 256 held back" in out and "K err oscar" in out
    rot = OscarRotations.from_pretrained(tmp_path / "bundle", config=model.config)
    config = json.loads((tmp_path / "bundle" / "oscar_config.json").read_text())
    assert config["calibration"]["num_tokens"] == 3072 and config["grouping"] == "head"
    assert rot.k_clip_ratios.shape == (2,)


def test_jsonl_and_text_data_are_tokenized_with_eos_between_documents(tmp_path):
    class ByteTokenizer:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [b + 1 for b in text.encode()]}

    (tmp_path / "d.jsonl").write_text(
        json.dumps({"text": "ab"}) + "\n" + json.dumps({"messages": [{"content": "c"}]}) + "\n"
    )
    assert load_calibration_tokens(tmp_path / "d.jsonl", ByteTokenizer()).tolist() == [98, 99, 0, 100, 0]
    (tmp_path / "d.txt").write_text("xyz")
    assert load_calibration_tokens(tmp_path / "d.txt", ByteTokenizer(), num_tokens=2, offset=1).tolist() == [122, 123]
    with pytest.raises(ValueError, match="holds 4 tokens"):
        load_calibration_tokens(tmp_path / "d.txt", ByteTokenizer(), num_tokens=9)


@pytest.mark.slow
@pytest.mark.skipif(not REF_MODEL.is_dir(), reason=f"reference model not found at {REF_MODEL} (set OSCAR_SHARED)")
def test_reference_model_bundle_beats_hadamard_decode_kl_by_a_third(tmp_path):
    """The default bundle against plain Hadamard on the reference model, float32 on the CPU (so that the result does
    not depend on the CPU's bf16 kernels). Measured: 0.41x on the RESULTS evaluation segments in float32, 0.44-0.48x
    in bf16 on the GPU; the bar here, 2/3, leaves room for this test's shorter segment. The 0.45x quality bar itself
    is a benchmark (benchmarks/RESULTS.md, quality section)."""
    from transformers import AutoModelForCausalLM

    from oscar_hf.evaluation import evaluate_caches

    rc = calibrate_main([
        "--model", str(REF_MODEL), "--data", str(REF_MODEL / "heldout_tokens.npy"), "--num-tokens", "32768",
        "--output", str(tmp_path / "bundle"), "--no-progress",
    ])
    assert rc == 0
    model = AutoModelForCausalLM.from_pretrained(REF_MODEL, dtype=torch.float32, attn_implementation="oscar").eval()
    rot = OscarRotations.from_pretrained(tmp_path / "bundle", config=model.config)
    tokens = torch.from_numpy(
        np.load(REF_MODEL / "heldout_tokens.npy")[CALIBRATION_END : CALIBRATION_END + 2049].astype(np.int64)
    )
    results = evaluate_caches(model, tokens, 1024, {
        "hadamard": lambda: OscarQuantizedCache(config=model.config, method="hadamard"),
        "oscar": lambda: OscarQuantizedCache(config=model.config, rotations=rot),
    })
    assert results["oscar"]["kl_mean"] <= 2 / 3 * results["hadamard"]["kl_mean"], results


# --- Every argument is checked before the model loads; errors are a message and exit status 2 (issue 21) -----------


@pytest.fixture
def cli_setup(tmp_path, monkeypatch):
    """A saved tiny model (vocabulary 97), a good token file, and a model loader that fails the test if called."""
    from transformers import AutoModelForCausalLM

    tiny_model().save_pretrained(tmp_path / "model")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 97, 4096).astype(np.uint16))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_model)
    return tmp_path


def _bad_tokens(tmp_path, name, array):
    np.save(tmp_path / name, array)
    return ["--data", str(tmp_path / name)]


@pytest.mark.parametrize(
    "extra, message",
    [
        (lambda t: ["--num-tokens", "0"], "--num-tokens: 0 is out of range; expected a positive integer"),
        (lambda t: ["--seq-len", "0"], "--seq-len: 0 is out of range; expected a positive integer"),
        (lambda t: ["--batch-size", "0"], "--batch-size: 0 is out of range; expected a positive integer"),
        (lambda t: ["--offset", "-100"], "--offset: -100 is out of range; expected a non-negative integer"),
        (lambda t: ["--key-tilt", "nan"], "--key-tilt: nan is out of range"),
        (lambda t: ["--grouping", "layer", "--key-tilt", "2"], "key_tilt=2.0"),
        (lambda t: ["--clip-fit", "--num-tokens", "300"], "Clip fitting needs held-back tokens"),
        (lambda t: ["--num-tokens", "5000"], "holds 4096 tokens from offset 0; 5000 were requested"),
        (
            lambda t: _bad_tokens(t, "big.npy", np.arange(4096) % 200),
            "ids in [0, 199], outside the model's vocabulary [0, 97)",
        ),
        (lambda t: _bad_tokens(t, "neg.npy", np.arange(4096) - 1), "ids in [-1, 3070]"),
        (
            lambda t: _bad_tokens(t, "f.npy", np.zeros(4096, np.float32)),
            "must hold a 1-D integer array of token ids, got float32",
        ),
        (lambda t: _bad_tokens(t, "b.npy", np.zeros(4096, bool)), "got bool"),
        (lambda t: _bad_tokens(t, "2d.npy", np.zeros((2, 2048), np.int32)), "got int32 (2, 2048)"),
        (lambda t: ["--data", str(t / "missing.npy")], "missing.npy: no such file"),
        (lambda t: ["--output", str(t / "tokens.npy")], "exists and is not a directory"),
        (lambda t: ["--output", str(t / "tokens.npy" / "sub")], "is a file, so nothing can be created under it"),
        (lambda t: ["--push-to-hub", "not//valid"], "is not a Hub repository id"),
    ],
    ids=["num-tokens-0", "seq-len-0", "batch-size-0", "negative-offset", "key-tilt-nan", "tilt-without-head",
         "clip-fit-no-heldout", "too-few-tokens", "ids-above-vocab", "negative-ids", "float-tokens", "bool-tokens",
         "2d-tokens", "missing-data", "output-is-a-file", "output-under-a-file", "bad-repo-id"],
)
def test_cli_refuses_bad_arguments_before_loading_the_model(cli_setup, capsys, extra, message):
    t = cli_setup
    base = ["--model", str(t / "model"), "--data", str(t / "tokens.npy"), "--num-tokens", "3072",
            "--output", str(t / "bundle"), "--seq-len", "256", "--no-progress"]
    rc = calibrate_main(base + extra(t))
    assert rc == 2
    err = capsys.readouterr().err
    assert "oscar-calibrate: error:" in err and message in err.replace("\n", " "), err
    assert not (t / "bundle").exists()


def test_negative_offsets_are_refused_rather_than_counted_from_the_end(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(100, dtype=np.int32))
    with pytest.raises(ValueError, match="offset must be a non-negative integer"):
        load_calibration_tokens(tmp_path / "t.npy", num_tokens=10, offset=-10)

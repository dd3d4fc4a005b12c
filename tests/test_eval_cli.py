"""oscar-eval: row parsing, the calibration-overlap guard, KV byte accounting, and the whole command on a tiny model
(JSON report, plot, model-card table written into the bundle)."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache

from oscar_hf import OscarQuantizedCache, OscarRotations
from oscar_hf.evaluation import cache_kv_bits_per_element, cache_kv_bytes, smooth
from oscar_hf.evaluation.cli import calibration_overlap, main, markdown_table, parse_methods, quanto_unavailable_reason


def test_parse_methods_reads_rows_variants_and_overrides(tmp_path):
    specs = parse_methods(
        "bf16,naive,hadamard,oscar,quanto-int2",
        ["noclip=hadamard:k_clip_ratio=1,v_clip_ratio=1.0", f"other={tmp_path}:recent_tokens=128",
         "q4-r32=quanto-int4:residual_length=32"],
    )
    assert [s.name for s in specs] == ["bf16", "naive", "hadamard", "oscar", "quanto-int2", "noclip", "other", "q4-r32"]
    assert [s.kind for s in specs] == ["exact", "oscar", "oscar", "oscar", "quanto", "oscar", "oscar", "quanto"]
    assert specs[5].base == "hadamard" and specs[5].overrides == {"k_clip_ratio": 1, "v_clip_ratio": 1.0}
    assert specs[6].base == str(tmp_path) and specs[6].overrides == {"recent_tokens": 128}
    assert specs[7].overrides == {"residual_length": 32}


@pytest.mark.parametrize(
    "methods, variants, message",
    [
        ("bf16,int3", [], "Unknown method 'int3'"),
        ("bf16", ["x=hadamard:recent=3"], "unknown overrides ['recent']"),
        ("bf16", ["x=quanto-int2:recent_tokens=3"], "unknown overrides ['recent_tokens']"),
        ("bf16", ["x=/no/such/bundle"], "neither a method"),
        ("bf16", ["justaname"], "expected NAME=BASE"),
        ("bf16,naive", ["naive=hadamard"], "repeated: ['naive']"),
    ],
)
def test_parse_methods_rejects_bad_rows_with_the_reason(methods, variants, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_methods(methods, variants)


def test_calibration_overlap_is_reported_only_for_the_same_file_and_overlapping_range(tmp_path):
    data = tmp_path / "tokens.npy"
    np.save(data, np.zeros(10, dtype=np.uint16))
    config = {"calibration": {"data": str(data), "offset": 100, "num_tokens": 50}}
    assert "overlap the calibration tokens [100, 150)" in calibration_overlap(config, str(data), 140, 300)
    assert calibration_overlap(config, str(data), 150, 300) is None
    assert calibration_overlap(config, str(data), 0, 100) is None
    other = tmp_path / "other.npy"
    np.save(other, np.zeros(10, dtype=np.uint16))
    assert calibration_overlap(config, str(other), 140, 300) is None
    assert calibration_overlap({}, str(data), 140, 300) is None  # nothing recorded: nothing to check


def test_kv_bits_of_an_exact_bf16_cache_are_16():
    model = tiny_model("qwen3", attn_implementation="sdpa").to(torch.bfloat16)
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.randint(3, 128, (1, 40)), past_key_values=cache)
    assert cache_kv_bits_per_element(cache) == 16.0
    # 2 layers x K and V x 2 KV heads x 40 tokens x head_dim 32 x 2 bytes
    assert cache_kv_bytes(cache) == 2 * 2 * 2 * 40 * 32 * 2


def test_kv_bits_of_the_oscar_cache_come_from_the_cache_itself():
    model = tiny_model("qwen3")
    cache = OscarQuantizedCache(model.config, method="hadamard", sink_tokens=4, recent_tokens=8)
    model(input_ids=torch.randint(3, 128, (1, 200)), past_key_values=cache)
    assert cache_kv_bits_per_element(cache) == cache.kv_bits_per_element()
    assert cache_kv_bytes(cache) == cache.held_bytes()


@pytest.mark.skipif(quanto_unavailable_reason() is not None, reason="optimum-quanto is not installed")
def test_quanto_int2_bytes_count_packed_codes_and_group_scales():
    from transformers import QuantizedCache

    model = tiny_model("qwen3", attn_implementation="sdpa").to(torch.bfloat16)
    cache = QuantizedCache(backend="quanto", config=model.config, nbits=2, q_group_size=32, residual_length=128)
    model(input_ids=torch.randint(3, 128, (1, 64)), past_key_values=cache)
    # The prompt is quantized whole on the first update: 2 bits per value plus a bf16 scale and shift per 32 values.
    assert cache_kv_bits_per_element(cache) == pytest.approx(2 + 32 / 32)


def test_smooth_is_a_trailing_moving_average():
    out = smooth(torch.tensor([1.0, 3.0, 5.0, 7.0]), 2)
    assert out.tolist() == [1.0, 2.0, 4.0, 6.0]


def test_markdown_table_formats_missing_values_as_dash():
    table = markdown_table({"bf16": {"KL mean": 0.0, "KV bits/elem": 16.0}, "naive": {"KL mean": 0.0123456}})
    assert table.splitlines() == [
        "| Method | KL mean | KV bits/elem |",
        "|---|---|---|",
        "| bf16 | 0 | 16 |",
        "| naive | 0.01235 | - |",
    ]


@pytest.fixture
def tiny_setup(tmp_path):
    """A tiny saved model, a token file, and an `oscar` bundle (random orthogonal rotations) whose recorded
    calibration range is tokens [0, 300) of that file."""
    model = tiny_model("qwen3", attn_implementation="sdpa")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(3, 128, size=1200).astype(np.uint16))
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(2, 1, 32, 32, generator=g, dtype=torch.float64))[0].float()
    rotations = OscarRotations(
        "oscar", 2, 2, 32, torch.tensor(0.96), torch.tensor(0.92), q, q.clone(),
        metadata={"model_id": str(model_dir), "calibration": {"data": str(tokens), "offset": 0, "num_tokens": 300}},
    )
    bundle = tmp_path / "bundle"
    rotations.save_pretrained(bundle)
    return model_dir, tokens, bundle


def test_oscar_eval_writes_report_plot_and_card(tiny_setup, tmp_path):
    pytest.importorskip("matplotlib")
    model_dir, tokens, bundle = tiny_setup
    out, plot = tmp_path / "eval.json", tmp_path / "kl.png"
    rc = main([
        "--model", str(model_dir), "--rotations", str(bundle), "--tokens", str(tokens), "--start", "300",
        "--prefix-tokens", "160", "--eval-tokens", "48", "--sink-tokens", "8", "--recent-tokens", "16",
        "--methods", "bf16,naive,hadamard,oscar", "--variant", "had-r128=hadamard:recent_tokens=128",
        "--dtype", "float32", "--device", "cpu", "--json", str(out), "--plot", str(plot), "--smooth", "8",
        "--update-card", "--no-progress",
    ])
    assert rc == 0
    report = json.loads(out.read_text())
    results = report["results"]
    # The exact row is named after the dtype it ran in (float32 here), whatever --methods called it.
    assert list(results) == ["fp32", "naive", "hadamard", "oscar", "had-r128"]
    assert results["fp32"]["kl_mean"] == 0 and results["fp32"]["top1_agreement"] == 1
    assert results["fp32"]["kv_bits_per_element"] == 32.0
    for name in ("naive", "hadamard", "oscar"):
        assert results[name]["kl_mean"] > 0
        assert 2.25 < results[name]["kv_bits_per_element"] < 32
        assert results[name]["kv_bytes"] < results["fp32"]["kv_bytes"]
    # A larger exact window holds more bytes.
    assert results["had-r128"]["kv_bytes"] > results["hadamard"]["kv_bytes"]
    assert results["had-r128"]["cache"]["recent_tokens"] == 128
    assert results["oscar"]["cache"]["rotations"] == str(bundle)
    assert len(report["kl_per_step"]["oscar"]) == 48
    assert report["settings"]["start"] == 300 and report["settings"]["end"] == 300 + 160 + 48
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = json.loads((bundle / "oscar_config.json").read_text())
    assert config["evaluation"]["results"]["oscar"]["KL mean"] == pytest.approx(results["oscar"]["kl_mean"])
    card = (bundle / "README.md").read_text()
    assert "| Method | Perplexity | KL mean | KL p99 | Top-1 agree | KV bits/elem | KV MiB |" in card
    oscar_row = next(line for line in card.splitlines() if line.startswith("| oscar |"))
    assert f"{results['oscar']['kl_mean']:.4g}" in oscar_row
    assert OscarRotations.from_pretrained(bundle).method == "oscar"  # the bundle still loads


def test_oscar_eval_uses_the_windows_the_bundle_records_unless_told_otherwise(tiny_setup, tmp_path):
    model_dir, tokens, bundle = tiny_setup
    rotations = OscarRotations.from_pretrained(bundle)
    rotations.metadata["windows"] = {"sink_tokens": 8, "recent_tokens": 16}
    rotations.save_pretrained(tmp_path / "b16")
    args = ["--model", str(model_dir), "--rotations", str(tmp_path / "b16"), "--tokens", str(tokens), "--start", "400",
            "--prefix-tokens", "40", "--eval-tokens", "8", "--methods", "bf16,hadamard,oscar", "--dtype", "float32",
            "--device", "cpu", "--json", str(tmp_path / "e.json"), "--no-progress"]
    for extra, sink, recent, source in (
        ([], 8, 16, f"the bundle {tmp_path / 'b16'}"),
        (["--recent-tokens", "24"], 8, 24, "--recent-tokens"),
    ):
        assert main(args + extra) == 0
        report = json.loads((tmp_path / "e.json").read_text())
        settings = report["settings"]
        assert (settings["sink_tokens"], settings["recent_tokens"]) == (sink, recent)
        assert settings["windows_from"] == {"sink_tokens": f"the bundle {tmp_path / 'b16'}", "recent_tokens": source}
        for row in ("hadamard", "oscar"):  # every 2-bit row, the baselines too, so that they stay comparable
            cache = report["results"][row]["cache"]
            assert (cache["sink_tokens"], cache["recent_tokens"]) == (sink, recent)


def test_oscar_eval_refuses_tokens_the_bundle_was_calibrated_on(tiny_setup, tmp_path, capsys):
    model_dir, tokens, bundle = tiny_setup
    args = ["--model", str(model_dir), "--rotations", str(bundle), "--tokens", str(tokens), "--start", "100",
            "--prefix-tokens", "32", "--eval-tokens", "8", "--methods", "bf16,oscar", "--dtype", "float32",
            "--device", "cpu", "--json", str(tmp_path / "e.json"), "--no-progress"]
    assert main(args) == 2
    assert "overlap the calibration tokens [0, 300)" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
    assert main(args + ["--allow-calibration-overlap"]) == 0


def test_oscar_eval_says_why_a_row_needs_rotations(tiny_setup, tmp_path, capsys):
    model_dir, tokens, _ = tiny_setup
    rc = main(["--model", str(model_dir), "--tokens", str(tokens), "--start", "0", "--prefix-tokens", "32",
               "--eval-tokens", "8", "--methods", "bf16,oscar", "--dtype", "float32", "--device", "cpu",
               "--json", str(tmp_path / "e.json"), "--no-progress"])
    assert rc == 2
    assert "needs fitted rotations: pass --rotations" in capsys.readouterr().err


# --- Every argument is checked before the model loads; errors are a message and exit status 2 (issue 21) -----------


@pytest.fixture
def no_model(monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def _eval_args(model_dir, tokens, bundle, tmp_path, *extra):
    return ["--model", str(model_dir), "--rotations", str(bundle), "--tokens", str(tokens), "--start", "400",
            "--prefix-tokens", "32", "--eval-tokens", "8", "--methods", "bf16,naive,oscar", "--dtype", "float32",
            "--device", "cpu", "--json", str(tmp_path / "e.json"), "--no-progress", *extra]


def _save(tmp_path, name, array):
    np.save(tmp_path / name, array)
    return tmp_path / name


@pytest.mark.parametrize(
    "array, message",
    [
        (np.random.default_rng(0).random(1200), "holds float64 values; token ids are integers"),
        (np.ones(1200, dtype=bool), "holds bool values"),
        (np.ones((2, 600), dtype=np.int32), "has shape (2, 600); token ids must be one 1-D sequence"),
        (np.full(1200, 200, dtype=np.int32), "ids in [200, 200], outside the model's vocabulary [0, 128)"),
        (np.full(1200, -1, dtype=np.int16), "ids in [-1, -1]"),
    ],
    ids=["float", "bool", "2d", "above-vocab", "negative"],
)
def test_oscar_eval_refuses_bad_token_files_before_loading_the_model(tiny_setup, tmp_path, capsys, no_model, array,
                                                                     message):
    model_dir, _, bundle = tiny_setup
    tokens = _save(tmp_path, "bad.npy", array)
    assert main(_eval_args(model_dir, tokens, bundle, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("oscar-eval: error: --tokens") and message in err, err
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--start", "-1000"], "argument --start: -1000 is out of range; expected a non-negative integer"),
        (["--prefix-tokens", "0"], "argument --prefix-tokens: 0 is out of range; expected a positive integer"),
        (["--recent-tokens", "x"], "argument --recent-tokens: 'x' is not an integer"),
        (["--variant", "r=hadamard:recent_tokens=-1"], "Row 'r': `recent_tokens` must be an integer >= 0"),
        (["--variant", "r=hadamard:k_clip_ratio='a'"], "Row 'r':"),
        (["--device", "bogus"], "--device 'bogus'"),
        (["--retrieval", "2", "--retrieval-value", "hexx"], "Unknown value style 'hexx'"),
        (["--json", "/"], "--json / is a directory"),
    ],
)
def test_oscar_eval_refuses_bad_arguments_before_loading_the_model(tiny_setup, tmp_path, capsys, no_model, extra,
                                                                   message):
    model_dir, tokens, bundle = tiny_setup
    assert main(_eval_args(model_dir, tokens, bundle, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert "oscar-eval: error:" in err and message in err, err


def test_the_overlap_guard_covers_variant_bundles(tiny_setup, tmp_path, capsys, no_model):
    model_dir, tokens, bundle = tiny_setup
    args = ["--model", str(model_dir), "--tokens", str(tokens), "--start", "100", "--prefix-tokens", "32",
            "--eval-tokens", "8", "--methods", "bf16", "--variant", f"mine={bundle}", "--dtype", "float32",
            "--device", "cpu", "--json", str(tmp_path / "e.json"), "--no-progress"]
    assert main(args) == 2
    assert f"overlap the calibration tokens [0, 300) recorded in the bundle {bundle}" in capsys.readouterr().err


def test_the_overlap_guard_covers_hub_bundles(tiny_setup, tmp_path, capsys, monkeypatch, no_model):
    import huggingface_hub

    model_dir, tokens, bundle = tiny_setup
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: str(bundle))
    args = _eval_args(model_dir, tokens, "org/bundle", tmp_path)
    args[args.index("--start") + 1] = "100"
    assert main(args) == 2
    assert "overlap the calibration tokens [0, 300) recorded in the bundle org/bundle" in capsys.readouterr().err


def test_the_overlap_guard_resolves_a_negative_recorded_offset(tmp_path):
    data = tmp_path / "tokens.npy"
    np.save(data, np.zeros(10, dtype=np.uint16))
    config = {"calibration": {"data": str(data), "offset": -1000, "num_tokens": 300}}  # [0, 300) of 1,000 tokens
    assert "[0, 300)" in calibration_overlap(config, str(data), 100, 200, num_tokens=1000)
    assert calibration_overlap(config, str(data), 300, 400, num_tokens=1000) is None
    assert "cannot be checked" in calibration_overlap(config, str(data), 300, 400)


def test_oscar_eval_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "usage: oscar-eval" in capsys.readouterr().out

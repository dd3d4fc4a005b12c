"""CPU dry run of the end-to-end GPU benchmark (benchmarks/bench_e2e.py) at toy scale: every section and row runs."""

import importlib.util
import json

from conftest import REPO


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", REPO / "benchmarks" / "bench_e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_e2e_dry_run_runs_every_section_without_errors(tmp_path, capsys):
    bench = load_bench()
    # Contexts past the 64 + 256 + 63 exact windows, so that every OSCAR cache holds a 2-bit body.
    argv = ["--tiny", "--device", "cpu", "--dtype", "float32", "--contexts", "448", "--quanto-contexts", "448",
            "--dynamic-largest", "448", "--oscar-largest", "512", "--batch-context", "2048", "--kv-budget-gib", "0.02",
            "--prefill-context", "448", "--prefill-chunk", "224", "--prefill-long-context", "896",
            "--prefill-long-chunks", "1", "--steps", "2", "--graph-steps", "2", "--warmup", "1",
            "--generate-contexts", "448", "--generate-tokens", "4",
            "--sections", "generate,decode,largest,batch,generate_batch,prefill",
            "--json", str(tmp_path / "e2e.json")]
    bench.main(argv)
    out = json.loads((tmp_path / "e2e.json").read_text())
    rows = [r for block in out["decode"] for r in block["rows"]]
    rows += out["largest"]["dynamic"] + out["largest"]["oscar"] + out["batch"]["rows"] + out["prefill"]
    rows += out["generate"] + out["generate_batch"]["rows"]
    quanto_missing = bench.quanto_unavailable("torch")
    failed = [(r["name"], r["error"]) for r in rows
              if r.get("error") and not (r["kind"] == "quanto" and quanto_missing)]
    assert not failed
    decode = {(r["kind"], r["mode"]) for r in out["decode"][0]["rows"] if r.get("ms")}
    expected = {
        ("dynamic", "eager"), ("static", "eager"), ("static", "compile"), ("oscar", "eager"), ("oscar", "compile")
    }
    assert expected <= decode
    generated = {(r["kind"], r["mode"]) for r in out["generate"] if r.get("ms")}
    assert generated == {("dynamic", "eager"), ("static", "compile"), ("oscar", "compile"), ("oscar", "eager")}
    assert all(r["logits_finite"] for r in rows if "logits_finite" in r)
    oscar = next(r for r in out["decode"][0]["rows"] if r["kind"] == "oscar")
    # 448 tokens (64 sink, a 2-bit body, the recent window) hold fewer bytes than 448 exact float32 tokens of the tiny
    # geometry (2 layers x 2 KV heads x head_dim 64, K and V).
    assert 0 < oscar["kv_held_bytes"] < 448 * 2 * 2 * 64 * 2 * 4
    assert out["batch"]["rows"][1]["batch"] > out["batch"]["rows"][0]["batch"]  # INT2 fits more sequences
    # generate() at the largest batch: the 2-bit cache fits more sequences in the same budget, each row is a batch.
    gb = {r["kind"]: r for r in out["generate_batch"]["rows"]}
    assert gb["oscar"]["batch"] > gb["static"]["batch"] >= 1
    assert gb["oscar"]["tokens_per_s"] > 0 and out["generate_batch"]["oscar_over_static"] is not None
    printed = capsys.readouterr().out
    assert "issue bars" in printed and "generate() at the largest batch" in printed


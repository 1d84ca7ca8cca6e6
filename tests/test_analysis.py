"""Analysis: MLflow -> tables and figures, and `pha-lab tables` end to end.

Two stores: the real `smoke` sweep run by the suite (plus one knockout evaluation), on which
`pha-lab tables` must execute every notebook and whose tables must equal the metrics of the runs
their provenance names (recomputed here with mlflow.search_runs); and a small store written with
MlflowClient whose values are chosen so that seed means, stds and deltas are checked by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from pha_lab.analysis import figures, tables
from pha_lab.analysis import runs as R
from pha_lab.cli import main

BRANCHES3 = "['gss', 'attn', 'ffn']"


def search(uri: str, run_ids: str) -> pd.DataFrame:
    """The runs named in a provenance cell, straight from mlflow.search_runs."""
    ids = [i for i in run_ids.split(",") if i]
    quoted = ", ".join(f"'{i}'" for i in ids)
    with _use_tracking_uri(uri):
        found = mlflow.search_runs(search_all_experiments=True, filter_string=f"attributes.run_id IN ({quoted})")
    assert sorted(found["run_id"]) == sorted(ids)
    return found


def is_png(path: Path) -> bool:
    data = Path(path).read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


# --------------------------------------------------------------------------- the smoke sweep, end to end
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The `smoke` sweep (6 tiny models, 10 steps each) and a per-layer knockout of its static PHA."""
    from pha_lab.sweep.runner import run_sweep
    from pha_lab.training.evaluate import evaluate

    runs_dir = tmp_path_factory.mktemp("smoke_runs")
    table = run_sweep("smoke", ["trainer.max_steps=10", "trainer.val_every_n_steps=10"], runs_dir=str(runs_dir))
    assert (table.state == "COMPLETE").all(), table
    pha = table.loc[table.cell == "model=pha_static,seed=0", "mlflow_run_id"].item()
    evaluate(pha, [f"tracking.runs_dir={runs_dir}"], knockout=["gss", "attn"], per_layer=True)
    return runs_dir, f"sqlite:///{runs_dir / 'mlflow.db'}"


@pytest.fixture(scope="module")
def rendered(smoke, tmp_path_factory):
    """`pha-lab tables` (what `make tables` runs) with its default sweeps, against the smoke store."""
    runs_dir, _ = smoke
    out = tmp_path_factory.mktemp("tables_out")
    csv = out.parent / "bench.csv"
    write_bench_csv(csv)
    assert main(["tables", "--runs-dir", str(runs_dir), "--out", str(out), "--efficiency-csv", str(csv)]) == 0
    return out


def test_make_tables_executes_every_notebook(rendered):
    for name in ("perplexity-text", "ablation", "mixing", "mqar", "efficiency"):
        book = json.loads((rendered / f"{name}.ipynb").read_text())
        outputs = [o for c in book["cells"] for o in c.get("outputs", [])]
        assert outputs and not [o for o in outputs if o["output_type"] == "error"], name
    for name in ("perplexity-text", "perplexity-text-paper", "ablation", "mixer-weights", "knockout", "mqar",
                 "mqar-lr", "efficiency", "efficiency-ratio"):
        for ext in ("md", "tex", "csv"):
            assert (rendered / f"{name}.{ext}").stat().st_size > 0, (name, ext)
    for name in ("perplexity-text", "ablation", "mixer-weights", "knockout", "mqar", "mqar-lr", "efficiency-tokens_per_s",
                 "efficiency-peak_mem_gb", "efficiency-throughput-ratio", "efficiency-memory-ratio"):
        assert is_png(rendered / f"{name}.png") and (rendered / f"{name}.pdf").is_file(), name
    # the MQAR notebook has no runs: one line, then the empty skeleton (header, no rows)
    mqar = json.loads((rendered / "mqar.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in mqar["cells"] for o in c.get("outputs", []))
    assert "No runs yet in sweep(s) mqar, repro_mqar" in text
    assert pd.read_csv(rendered / "mqar.csv").empty and "| sweep | model | width |" in (rendered / "mqar.md").read_text()


def test_perplexity_table_equals_the_runs_it_names(smoke, rendered):
    _, uri = smoke
    table = pd.read_csv(rendered / "perplexity-text.csv")
    assert len(table) == 6 and set(table["experiment"]) == {"smoke"} and (table["n"] == 1).all()
    assert set(table["model"]) == {"PHA", "PHA (gate)", "Transformer", "GSS", "GSS-Hybrid", "sequential PHA"}
    for _, row in table.iterrows():
        found = search(uri, row["runs"])
        assert row["test/ppl"] == pytest.approx(found["metrics.test/ppl"].mean(), rel=1e-12)
        assert row["test/bpb"] == pytest.approx(found["metrics.test/bpb"].mean(), rel=1e-12)
        assert row["train/tokens_seen"] == found["metrics.train/tokens_seen"].item() == 10 * 8 * 128
        assert row["config"] == found["tags.cell"].item().replace(",seed=0", "")
    md = (rendered / "perplexity-text.md").read_text()
    assert "Protocol: text / test, tokenizer bpe2048, context 128, stride 128" in md
    assert "training tokens per run: 10,240" in md


def test_ablation_table_equals_the_runs_it_names(smoke, rendered):
    _, uri = smoke
    table = pd.read_csv(rendered / "ablation.csv").fillna({"reference runs": ""})
    assert list(table["model.mixer"]) == ["static", "gate"] and (table["removed"] == "none").all()
    for _, row in table.iterrows():
        mine, ref = search(uri, row["runs"]), search(uri, row["reference runs"])
        assert row["test/ppl"] == pytest.approx(mine["metrics.test/ppl"].mean(), rel=1e-12)
        assert row["delta"] == pytest.approx(mine["metrics.test/ppl"].mean() - ref["metrics.test/ppl"].mean(), abs=1e-9)
    assert table.loc[0, "delta"] == 0 and table.loc[0, "runs"] == table.loc[1, "reference runs"]


def test_mixer_and_knockout_tables_equal_the_runs_they_name(smoke, rendered):
    _, uri = smoke
    weights = pd.read_csv(rendered / "mixer-weights.csv")
    assert set(weights["config"]) == {"model=pha_static", "model=pha_gate"} and set(weights["layer"]) == {0, 1}
    for _, row in weights.iterrows():
        found = search(uri, row["runs"])
        for b in ("gss", "attn", "ffn"):
            assert row[b] == pytest.approx(found[f"metrics.mixer/L{row['layer']}/{b}"].mean(), rel=1e-12)
        assert row[["gss", "attn", "ffn"]].sum() == pytest.approx(1.0, abs=1e-5)  # softmax weights
    knockout = pd.read_csv(rendered / "knockout.csv")
    assert list(knockout["layer"].astype(str)) == ["0", "1"] and set(knockout["config"]) == {"model=pha_static"}
    for _, row in knockout.iterrows():
        found = search(uri, row["runs"])
        for b in ("gss", "attn"):
            assert row[b] == pytest.approx(found[f"metrics.knockout/{b}/L{row['layer']}/delta_ppl"].item(), rel=1e-12)
    assert "ffn" not in knockout  # not knocked out


def test_efficiency_from_the_csv(rendered):
    ratios = pd.read_csv(rendered / "efficiency-ratio.csv")
    train = ratios[ratios["mode"] == "train"].set_index("seq_len")
    assert list(train.index) == [1024, 2048]  # 4096: the Transformer ran out of memory, no ratio
    assert train.loc[1024, "throughput ratio"] == pytest.approx(1200 / 1000)
    assert train.loc[2048, "memory ratio"] == pytest.approx(6.0 / 10.0)
    assert train.loc[1024, "runs"] == "bench.csv:2,bench.csv:5"
    md = (rendered / "efficiency.md").read_text()
    assert "1 configuration(s) without a measurement: 1 OOM." in md and "GPU: H100" in md
    assert "| gss |" not in md  # the `branches` part of the bench is not a model


# --------------------------------------------------------------------------- a store with known values
def write_bench_csv(path: Path) -> None:
    """Rows as `pha-lab bench` writes them (part, model, mode, seq_len, ...); one OOM, one other part."""
    rows = [("pha_180m", "train", 1024, 1200, 5.0, "ok"), ("pha_180m", "train", 2048, 1100, 6.0, "ok"),
            ("pha_180m", "train", 4096, 900, 9.0, "ok"), ("transformer_180m", "train", 1024, 1000, 6.0, "ok"),
            ("transformer_180m", "train", 2048, 800, 10.0, "ok"), ("transformer_180m", "train", 4096, float("nan"), float("nan"), "OOM")]
    table = pd.DataFrame([dict(part="models", model=m, mode=mo, seq_len=s, batch_size=8, tokens_per_s=t, peak_mem_gb=g,
                               status=st, gpu="H100") for m, mo, s, t, g, st in rows])
    table.loc[len(table)] = dict(part="branches", model="gss", mode="train", seq_len=1024, batch_size=8, tokens_per_s=5e4,
                                 peak_mem_gb=1.0, status="ok", gpu="H100")
    table.to_csv(path, index=False)


def log_run(client, exp_id, parent, cell, seed, params, metrics, status="FINISHED", extra_tags=None):
    tags = {"mlflow.parentRunId": parent, "sweep": "synth", "cell": f"{cell},seed={seed}", "seed": str(seed),
            "n_params": "1000000", "protocol.dataset": "text", "protocol.split": "test", "protocol.tokenizer": "bpe64",
            "protocol.context": "32", "protocol.stride": "32", "protocol.n_tokens": "4096", "protocol.n_bytes": "9000",
            "protocol.metric": "ppl", **(extra_tags or {})}
    base = {"seed": seed, "model.layout": "parallel", "model.branches": BRANCHES3, "model.mixer": "static",
            "model.d_model": 64, "model.n_layers": 2, "model.overrides": "[]", "data.source": "text", "optim.lr": 0.003,
            "trainer.max_steps": 100, "tracking.run_name": f"synth:{cell},seed={seed}", "trainer.cpu_threads": seed}
    run = client.create_run(exp_id, tags=tags)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in {**base, **params}.items()], tags=[])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Known values: full PHA ppl 10/12/14 over seeds 0-2 (mean 12, std 2), no-GSS 15/16, gate 11/13,
    one FAILED and one KILLED run, a Transformer, mixer weights and knockouts; MQAR runs over two LRs."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('synth') / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("synth")
    parent = client.create_run(exp, tags={"sweep_parent": "true", "sweep": "synth"}).info.run_id
    ids = {}
    for seed, (ppl, bpb) in enumerate([(10.0, 1.0), (12.0, 1.1), (14.0, 1.2)]):
        layer_w = {f"mixer/L{i}/{b}": w + 0.01 * seed for i in range(2) for b, w in zip(("gss", "attn", "ffn"), (0.5, 0.2, 0.3))}
        ko = {"knockout/gss/L0/delta_ppl": 1.0 + seed, "knockout/gss/L1/delta_ppl": 2.0 * (seed + 1),
              "knockout/gss/all/delta_ppl": 9.0}
        ids[("full", seed)] = log_run(client, exp, parent, "variant=full", seed, {},
                                      {"test/ppl": ppl, "test/bpb": bpb, "train/tokens_seen": 4096, **layer_w, **ko})
    for seed, ppl in enumerate([15.0, 16.0]):
        ids[("no_gss", seed)] = log_run(client, exp, parent, "variant=no_gss", seed, {"model.branches": "['attn', 'ffn']"},
                                        {"test/ppl": ppl, "test/bpb": 1.5}, extra_tags={"n_params": "700000"})
    for seed, ppl in enumerate([11.0, 13.0]):
        ids[("gate", seed)] = log_run(client, exp, parent, "variant=gate", seed, {"model.mixer": "gate"}, {"test/ppl": ppl})
    log_run(client, exp, parent, "variant=gate", 2, {"model.mixer": "gate"}, {"test/ppl": 1.0}, status="FAILED")
    log_run(client, exp, parent, "variant=no_gss", 2, {"model.branches": "['attn', 'ffn']"}, {}, status="KILLED")
    ids["transformer"] = log_run(client, exp, parent, "variant=transformer", 0,
                                 {"model.layout": "serial", "model.branches": "['attn', 'ffn']"}, {"test/ppl": 20.0})
    client.set_terminated(parent, "FINISHED")

    mq = client.create_experiment("synth_mqar")
    mq_parent = client.create_run(mq, tags={"sweep_parent": "true"}).info.run_id
    acc = {(1e-3, 64): (0.50, 0.70), (3e-3, 64): (0.80, 0.90), (1e-3, 128): (0.30, 0.30), (3e-3, 128): (0.20, 0.10)}
    for (lr, seq), values in acc.items():
        for seed, a in enumerate(values):
            log_run(client, mq, mq_parent, f"model=pha,lr={lr},seq={seq}", seed,
                    {"data.source": "mqar", "optim.lr": lr, "data.seq_len": seq, "data.mqar.num_kv_pairs": seq // 16},
                    {"test/accuracy": a}, extra_tags={"protocol.metric": "accuracy"})

    # `pha-lab bench` logs one run per benchmark: its CSV as an artifact and `{metric}/{part}/{model}/{mode}/{T}`
    bench_dir = tmp_path_factory.mktemp("bench")
    write_bench_csv(bench_dir / "efficiency-1.csv")
    for name, with_csv in (("efficiency", True), ("efficiency_metrics", False)):
        exp_id = client.create_experiment(name, artifact_location=(bench_dir / "artifacts").as_uri())
        run = client.create_run(exp_id, tags={"gpu": "H100"}).info.run_id
        client.log_batch(run, metrics=[Metric(f"{m}/models/{model}/prefill/8192", v, 0, 0) for model, tps, mem in
                                       (("pha_125m", 1500.0, 4.0), ("transformer_125m", 1000.0, 8.0))
                                       for m, v in (("tokens_per_s", tps), ("peak_mem_gb", mem))])
        if with_csv:
            client.log_artifact(run, str(bench_dir / "efficiency-1.csv"))
        client.set_terminated(run, "FINISHED")
    return uri, ids


def test_load_runs_one_row_per_child_run(synth):
    uri, ids = synth
    runs = R.load_runs("synth", uri)
    assert len(runs) == 10 and set(runs["run_id"]) >= set(ids.values())  # parent dropped; FAILED/KILLED kept here
    full = runs[runs["run_id"] == ids[("full", 1)]].iloc[0]
    assert full["config"] == "variant=full" and full["seed"] == 1 and full["model.d_model"] == 64
    assert full["test/ppl"] == 12.0 and full["n_params"] == 1_000_000 and full["protocol.dataset"] == "text"
    # seeds (and bookkeeping keys such as trainer.cpu_threads) do not split a configuration; other keys do
    assert runs.loc[runs["config"] == "variant=full", "config_id"].nunique() == 1
    assert runs.loc[runs["config"] == "variant=transformer", "config_id"].item() != full["config_id"]
    done, note = R.finished(runs)
    assert len(done) == 8 and note == "2 run(s) excluded because they did not finish (1 FAILED, 1 KILLED)."


def test_seed_aggregation_by_hand(synth):
    uri, ids = synth
    done, _ = R.finished(R.load_runs("synth", uri))
    agg = R.aggregate(done, ["test/ppl", "test/bpb"]).set_index("config")
    full = agg.loc["variant=full"]
    assert (full["test/ppl"], full["test/ppl std"], full["n"]) == (12.0, 2.0, 3)  # (10+12+14)/3; sqrt((4+0+4)/2)
    assert full["test/bpb"] == pytest.approx(1.1) and full["test/bpb std"] == pytest.approx(0.1)
    assert full["runs"] == ",".join(ids[("full", s)] for s in range(3))  # ordered by seed
    no_gss = agg.loc["variant=no_gss"]
    assert no_gss["test/ppl"] == 15.5 and no_gss["test/ppl std"] == pytest.approx(math.sqrt(0.5)) and no_gss["n"] == 2
    assert agg.loc["variant=gate", "test/bpb n"] == 0 and math.isnan(agg.loc["variant=gate", "test/bpb"])
    assert math.isnan(agg.loc["variant=transformer", "test/ppl std"])  # one seed: no std


def test_ablation_deltas_by_hand(synth):
    uri, ids = synth
    table = tables.ablation_table(R.load_runs("synth", uri))
    frame = table.frame.set_index(["removed", "model.mixer"])
    # full PHA first (although the no-GSS model is smaller), then branch removals, then mixers; no serial Transformer
    assert list(frame.index) == [("none", "static"), ("-gss", "static"), ("none", "gate")]
    assert frame.loc[("-gss", "static"), "delta"] == 15.5 - 12.0
    assert frame.loc[("none", "gate"), "delta"] == 12.0 - 12.0
    assert frame.loc[("none", "gate"), "reference runs"] == frame.loc[("none", "static"), "runs"]
    md = table.to_markdown()
    assert "2 run(s) excluded because they did not finish (1 FAILED, 1 KILLED)." in md  # both are PHA runs
    assert "| synth | -gss | static | 0.7M | 2 | 15.50 ± 0.71 | 1.500 ± 0.000 | 3.50 |" in md
    assert "Protocol: text / test, tokenizer bpe64, context 32, stride 32, 4,096 scored tokens (9,000 bytes)" in md


def test_perplexity_mixer_knockout_tables_by_hand(synth):
    uri, ids = synth
    runs = R.load_runs("synth", uri)
    ppl = tables.perplexity_table(runs, "text").frame.set_index("model")
    assert ppl.loc["PHA", "test/ppl"] == 12.0 and ppl.loc["Transformer", "test/ppl"] == 20.0
    assert list(ppl.index)[:2] == ["PHA", "PHA (gate)"] and tables.perplexity_table(runs, "wikitext103").frame.empty
    mix = tables.mixer_table(runs).frame
    layer0 = mix[(mix["config"] == "variant=full") & (mix["layer"] == 0)].iloc[0]
    assert layer0["gss"] == pytest.approx(0.51) and layer0["gss std"] == pytest.approx(0.01) and layer0["n"] == 3
    ko = tables.knockout_table(runs).frame.set_index("layer")
    assert ko.loc[0, "gss"] == pytest.approx(2.0) and ko.loc[1, "gss"] == pytest.approx(4.0)  # mean(1,2,3); mean(2,4,6)
    assert ko.loc[1, "gss std"] == pytest.approx(2.0) and ko.loc["all", "gss"] == 9.0 and list(ko.index) == [0, 1, "all"]


def test_mqar_best_over_learning_rates_by_hand(synth):
    uri, _ = synth
    runs = R.load_runs("synth_mqar", uri)
    best = tables.mqar_table(runs).frame.set_index("data.seq_len")
    assert best.loc[64, "optim.lr"] == 3e-3 and best.loc[64, "test/accuracy"] == pytest.approx(0.85)  # vs 0.60 at 1e-3
    assert best.loc[128, "optim.lr"] == 1e-3 and best.loc[128, "test/accuracy"] == pytest.approx(0.30)  # vs 0.15
    assert best.loc[64, "learning rates"] == "0.001, 0.003" and best.loc[64, "model"] == "PHA"
    assert len(tables.mqar_lr_table(runs).frame) == 4


def test_efficiency_from_mlflow_and_from_nothing(synth, tmp_path):
    uri, _ = synth
    bench, source = tables.load_efficiency(tmp_path / "absent.csv", uri)  # the run's CSV artifact
    assert "efficiency-1.csv" in source and len(bench) == 6 and set(bench["status"]) == {"ok", "OOM"}
    assert bench["source"].str.endswith("/efficiency-1.csv:2").sum() == 1
    bench, source = tables.load_efficiency(None, uri, "efficiency_metrics")  # no artifact: from the metric names
    assert source.startswith("metrics of run") and list(bench["model"]) == ["pha_125m", "transformer_125m"]
    ratios = tables.efficiency_ratios(bench).frame.iloc[0]
    assert ratios["throughput ratio"] == 1.5 and ratios["memory ratio"] == 0.5 and ratios["pair"] == "pha_125m / transformer_125m"
    empty, source = tables.load_efficiency(tmp_path / "absent.csv", f"sqlite:///{tmp_path / 'none.db'}")
    assert empty.empty and source.startswith("no CSV") and tables.efficiency_ratios(empty).frame.empty
    assert not (tmp_path / "none.db").exists()  # reading a missing store does not create one


# --------------------------------------------------------------------------- rendering, figures, failures
def test_tables_render_markdown_and_latex(tmp_path):
    frame = pd.DataFrame({"experiment": ["s_1"], "model": ["PHA"], "test/ppl": [12.0], "test/ppl std": [2.0],
                          "n": [3], "runs": ["aaaaaaaaaaaa,bbbbbbbbbbbb"]})
    table = tables.Table("t", "A & B", frame, {"experiment": "sweep", "model": "model", "test/ppl": "test PPL",
                                              "n": "seeds", "runs": "runs"}, ["50% of runs_dir"], tables.FORMATS)
    md = table.to_markdown()
    assert "| sweep | model | test PPL | seeds | runs |\n|---|---|---|---|---|\n| s_1 | PHA | 12.00 ± 2.00 | 3 | aaaaaaaa, bbbbbbbb |" in md
    tex = table.to_latex()
    assert r"\caption{A \& B}" in tex and r"s\_1 & PHA & 12.00 $\pm$ 2.00 & 3 & aaaaaaaa, bbbbbbbb \\" in tex
    assert r"\toprule" in tex and r"50\% of runs\_dir" in tex and tex.count("&") == 2 * 4 + 1
    empty = tables.Table("e", "E", frame.iloc[0:0], table.columns)
    assert empty.to_markdown().splitlines()[4] == "| – | – | – | – | – |" and r"-- & -- & -- & -- & -- \\" in empty.to_latex()
    paths = table.save(tmp_path)
    assert pd.read_csv(paths["csv"])["runs"].item() == "aaaaaaaaaaaa,bbbbbbbbbbbb"  # full ids in the CSV


def test_reference_numbers_carry_their_regime():
    wt = tables.reference_table("wikitext-103-raw-v1").frame.set_index("model")
    assert "converted from pretrained GPT-2" in wt.loc["Hedgehog (GPT-2 125M)", "regime"]
    assert "Pile" in wt.loc["H3-125M", "regime"] and (wt.loc[["PHA-125M", "PHA-180M"], "regime"] == "scratch").all()
    owt = tables.reference_table("openwebtext-sample").frame
    assert set(owt["model"]) == {"PHA-125M", "Transformer-125M", "GSS-Hybrid-125M"} and owt["provenance"].str.len().min() > 0
    assert tables.reference_table("text").frame.empty


def test_figures_are_pngs_with_labelled_axes(synth, tmp_path):
    uri, _ = synth
    runs = R.load_runs("synth", uri)
    mix = tables.mixer_table(runs)
    fig = figures.mixer_heatmaps(tables.heatmap_frames(mix), tmp_path / "mix.png")
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("branch", "layer") and is_png(tmp_path / "mix.png")
    assert (tmp_path / "mix.pdf").is_file()
    fig = figures.per_layer_lines(tables.knockout_table(runs).frame, ["gss"], tmp_path / "ko.png", "Δ test PPL")
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("layer", "Δ test PPL") and is_png(tmp_path / "ko.png")
    assert list(fig.axes[0].lines[0].get_xdata()) == [0, 1]  # the "all" row is not a layer
    abl = tables.ablation_table(runs).frame
    fig = figures.metric_bars(abl, "delta", ["removed", "model.mixer"], tmp_path / "bars.png", "Δ test PPL")
    assert fig.axes[0].get_xlabel() == "Δ test PPL" and len(fig.axes[0].patches) == 3 and is_png(tmp_path / "bars.png")
    ratio = pd.DataFrame({"pair": ["a / b"] * 2, "mode": ["train"] * 2, "seq_len": [1024, 2048], "throughput ratio": [1.1, 1.3]})
    fig = figures.curves(ratio, x="seq_len", y="throughput ratio", line=["pair"], panel=["mode"], path=tmp_path / "r.png",
                         xlabel="context length (tokens)", ylabel="PHA / Transformer throughput", logx=2,
                         reference={"paper": 1.24})
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_xscale()) == ("context length (tokens)", "PHA / Transformer throughput", "log")
    assert any(list(line.get_ydata()) == [1.24, 1.24] for line in ax.lines) and is_png(tmp_path / "r.png")
    # no data: the labelled skeleton, not an error
    fig = figures.curves(ratio.iloc[0:0], x="seq_len", y="throughput ratio", line=["pair"], panel=["mode"],
                         path=tmp_path / "e.png", xlabel="context length (tokens)", ylabel="ratio")
    assert fig.axes[0].get_xlabel() == "context length (tokens)" and figures.NO_DATA in [t.get_text() for t in fig.axes[0].texts]
    # the training callback's single-run heatmap keeps its signature and returns its path
    assert figures.mixer_heatmap(pd.DataFrame({"gss": [0.5]}, index=[0]), tmp_path / "one.png") == tmp_path / "one.png"


def test_a_failing_cell_fails_pha_lab_tables(tmp_path, monkeypatch, capsys):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    params = new_code_cell("tracking_uri = sweeps = out_dir = None")
    params.metadata["tags"] = ["parameters"]
    book = new_notebook(cells=[params, new_code_cell("raise RuntimeError('boom')")],
                        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(book, tmp_path / "mqar.ipynb")
    monkeypatch.setattr(tables, "NOTEBOOK_DIR", tmp_path)
    assert main(["tables", "--notebooks", "mqar", "--tracking-uri", "sqlite:///unused.db", "--out", str(tmp_path / "out")]) == 1
    assert "1 notebook(s) failed: mqar" in capsys.readouterr().err
    assert "boom" in (tmp_path / "out" / "mqar.ipynb").read_text()


def test_notebooks_are_committed_clean():
    import nbformat

    for name in tables.NOTEBOOKS:
        book = nbformat.read(tables.NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
        nbformat.validate(book)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert book.metadata.kernelspec.name == "python3", name
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: clear the outputs"
        params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and "tracking_uri = None" in params[0].source and "sweeps = None" in params[0].source

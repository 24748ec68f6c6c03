"""The pre-registered CRD experiments: Experiment 1 (``configs/lpba40_crd_exp1.py``, 64x80x64, n = 4) and
Experiment 2 (``configs/lpba40_crd_exp2.py``, the paper's 128^3, n = 2); read the config's docstring first.
The teacher phase, the gate, the student phase if the gate passes, and the analysis.

    python benchmarks/crd_experiment.py --data-root /path/to/lpba40     # runs or resumes; hours on 2 cores
    python benchmarks/crd_experiment.py --status                         # progress, nothing trained
    python benchmarks/crd_experiment.py --report                         # results files from what finished
    python benchmarks/crd_experiment.py --experiment 2 ...               # the 128^3 regime

Everything lives in the run folder (default ``~/crd-runs/reproduce_lpba40_3d-ll-exp1`` / ``..._exp2``,
outside the work tree; re-running resumes). The gate's numbers go to ``gate.json`` there; ``--report`` (and
the end of a run) writes ``benchmarks/results/crd_experiment<N>.{md,json}``: the teacher phase's Dice, the
gate, and, when the students finished, the five-stream table with both intervals and the verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import crd_stats  # noqa: E402
from reproduce import RUNS, reuse_stages, shipped_main_run  # noqa: E402

from configs import lpba40_crd_exp1, lpba40_crd_exp2  # noqa: E402

PROTOCOLS = {1: lpba40_crd_exp1, 2: lpba40_crd_exp2}
WORKDIRS = {1: RUNS / "reproduce_lpba40_3d-ll-exp1", 2: RUNS / "reproduce_lpba40_exp2"}
protocol = lpba40_crd_exp1  # the experiment this process runs (select() sets it)


def select(experiment: int) -> None:
    global protocol
    protocol = PROTOCOLS[experiment]


def result_name() -> str:
    return f"crd_experiment{next(k for k, v in PROTOCOLS.items() if v is protocol)}"


def _config(args, fst: str = ""):
    config = protocol.get_config(fst)
    config.workdir = str(args.workdir)
    if args.data_root:
        config.data.root = args.data_root
    if args.steps:  # dry runs only: every stage this many steps
        from crd_jax.config import set_steps

        set_steps(config, args.steps)
        config.train.eval_every = args.steps
        config.eval.val_pairs = 1
    if args.max_pairs:
        config.eval.max_pairs = args.max_pairs
    for dotted in getattr(args, "overrides", ()):  # "train.deadline=123", "data.shape=(32,32,32)" (gpu_science.py)
        import ast

        key, value = dotted.split("=", 1)
        *path, leaf = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[leaf] = ast.literal_eval(value) if value[:1] in "([{-0123456789" or value in ("True", "False") else value
    return config


def write_text(path: Path, text: str) -> None:
    from crd_jax.training.pipeline import write_text as atomic_write

    atomic_write(path, text)


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=1))


def _eval_rows(workdir: Path, stage: str):
    path = workdir / "stages" / stage / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def _load(workdir: Path, stage: str):
    from crd_jax.model_io import load_model
    from crd_jax.models import build as mbuild

    params, spec = load_model(workdir / "stages" / stage / "model")
    return mbuild.model_from_spec(spec), params


def saved_gate(workdir: Path):
    """The gate a run reached (``gate.json``), or None before it."""
    path = workdir / "gate.json"
    return json.loads(path.read_text()) if path.exists() else None


def gate(config, workdir: Path) -> dict:
    """The protocol's FST choice (training pairs) and gate (validation pairs), cached in ``gate.json``."""
    from crd_jax.data import build_datasets, dataset_labels
    from crd_jax.training import diagnostics as diag
    from crd_jax.training.pipeline import evaluation_pairs, network_multiple

    saved = saved_gate(workdir)
    if saved is not None:
        return saved
    path = workdir / "gate.json"
    datasets = build_datasets(config.data, network_multiple(config))
    val, train = datasets[config.eval.split], datasets["train"]
    labels = dataset_labels(config.data, val)
    pairs = diag.headroom_pairs(len(train))
    choice = {}
    for key, stage in protocol.FSTS.items():
        model, params = _load(workdir, stage)
        choice[stage] = diag.mean_dice(model, params, train, pairs, labels)
    fst = protocol.FSTS["half"] if choice[protocol.FSTS["half"]] >= choice[protocol.FSTS["full"]] else protocol.FSTS["full"]
    model, params = _load(workdir, fst)
    factor = 2 ** int(config.model.shift)
    ceiling = diag.ceiling(model, params, val, evaluation_pairs(config, val), labels, factor)["ceiling_dice"]
    vm_ll = _eval_rows(workdir, protocol.BASELINE_LOW)["dice_mean"]
    fst_dice = _eval_rows(workdir, fst)["dice_mean"]
    result = {
        "fst_choice_train_dice": choice,
        "fst": fst,
        "fst_val_dice": fst_dice,
        "vm_ll_val_dice": vm_ll,
        "ceiling_val_dice": ceiling,
        "fst_minus_vm_ll": fst_dice - vm_ll,
        "ceiling_minus_vm_ll": ceiling - vm_ll,
        "threshold": protocol.GATE,
        "headroom_pairs": [[train.ids[m], train.ids[f]] for m, f in pairs],
    }
    result["passed"] = bool(result["fst_minus_vm_ll"] >= protocol.GATE and result["ceiling_minus_vm_ll"] >= protocol.GATE)
    write_json(path, result)
    return result


def _progress(workdir: Path) -> dict:
    """Steps reached by the stages that started and have not finished (from the run's metrics log)."""
    from run_status import read_progress

    from crd_jax.training.workdir_config import remembered

    # the latest config the run was started with (the student phase appends its stages to the teacher phase's)
    config = remembered(workdir) or {"stages": {}}
    out = {}
    for stage, p in read_progress(workdir / "metrics.jsonl").items():
        if not (workdir / "stages" / stage / "model").exists() and stage in config["stages"]:
            out[stage] = {"step": int(p["step"]), "steps": int(config["stages"][stage]["steps"])}
    return out


def _per_pair(workdir: Path, stage: str):
    rows = _eval_rows(workdir, stage)
    return None if rows is None else {(r["moving"], r["fixed"]): r["dice"] for r in rows["pairs"]}


def _stream_means(per_pair: dict, streams: list) -> dict:
    """Per finished stream: each arm's mean Dice over the validation pairs and each CRD arm minus the control,
    pair by pair (the quantity the analysis takes)."""
    out = {}
    for s in streams:
        ctl = per_pair["ctl"][s]
        row = {arm: float(sum(per_pair[arm][s].values()) / len(per_pair[arm][s])) for arm in protocol.ARMS}
        for arm in protocol.ARMS:
            if arm != "ctl":
                row[f"{arm}_minus_ctl"] = float(sum(per_pair[arm][s][k] - ctl[k] for k in ctl) / len(ctl))
        out[str(s)] = row
    return out


def _stream_table(streams: dict, partial: bool) -> list:
    crd = [a for a in protocol.ARMS if a != "ctl"]
    lines = [
        "",
        "| Stream | " + " | ".join(f"{a} Dice" for a in protocol.ARMS) + " | " + " | ".join(f"{a} - ctl" for a in crd) + " |",
        "|---" * (1 + len(protocol.ARMS) + len(crd)) + "|",
    ]
    for s, row in streams.items():
        lines.append(
            f"| {s} | "
            + " | ".join(f"{row[a]:.4f}" for a in protocol.ARMS)
            + " | "
            + " | ".join(f"{row[a + '_minus_ctl']:+.4f}" for a in crd)
            + " |"
        )
    if partial:
        lines += ["", "(Descriptive: the protocol's intervals and verdict wait for all five streams.)"]
    return lines


def _distill_diagnostics(workdir: Path) -> list:
    """The diagnostics each distillation stage wrote: ``stages/<name>/diagnostics.json``, or the run's
    ``results.json`` (where a run that finished keeps them)."""
    found = {}
    if (workdir / "results.json").exists():
        for r in json.loads((workdir / "results.json").read_text()):
            if "diagnostics" in r:
                found[r["stage"]] = r["diagnostics"]
    for path in sorted((workdir / "stages").glob("*/diagnostics.json")):
        found.setdefault(path.parent.name, json.loads(path.read_text()))
    return [found[k] for k in sorted(found)]


def baseline_label() -> str:
    """The gate's reference model as the tables name it: VM-LL (Experiment 1, n = 4) or VM-L (Experiment 2, n = 2);
    the gate's JSON keys keep the ``vm_ll`` spelling for both."""
    return {"vm_ll": "VM-LL", "vm_l": "VM-L"}[protocol.BASELINE_LOW]


def report(workdir: Path, out: Path, draws: int) -> dict:
    """``crd_experiment<N>.{md,json}`` from whatever has finished."""
    low = baseline_label()
    teacher = {s: _eval_rows(workdir, s) for s in protocol.TEACHER_PIPELINE}
    teacher = {
        s: {k: r[k] for k in ("label", "dice_mean", "dice_std", "folds_mean", "num_pairs")} for s, r in teacher.items() if r
    }
    g = saved_gate(workdir)
    payload = {
        "protocol": protocol.__name__.replace(".", "/") + ".py",
        "started": (workdir / "config.json").exists(),
        "teacher_phase": teacher,
        # every finished teacher stage, evaluated (after training) or not (S1 has no validation of its own)
        "teacher_finished": [s for s in protocol.TEACHER_PIPELINE if s in teacher or (workdir / "stages" / s / "model").exists()],
        "gate": g,
    }
    lines = [f"### {protocol.get_config().name} (pre-registered, {protocol.__name__.replace('.', '/')}.py)"]
    if teacher:
        lines += ["", "| Stage | Val Dice | Pairs | Folds |", "|---|---|---|---|"]
        lines += [
            f"| {r['label']} | {r['dice_mean']:.4f} ({r['dice_std']:.4f}) | {r['num_pairs']} | {r['folds_mean']:.1f} |"
            for r in teacher.values()
        ]
    restored = json.loads((workdir / "restored.json").read_text()) if (workdir / "restored.json").exists() else []
    if restored:  # stages this run folder did not train itself (restore_shipped_stages)
        payload["restored"] = restored
        lines += ["", "Restored from the package (trained by an earlier run of this protocol, whose folder was lost): "]
        lines[-1] += ", ".join(f"{r['stage']} ({r['from']}, {r['at']})" for r in restored) + "."
    progress = _progress(workdir)
    if progress:
        payload["progress"] = progress
        lines += [
            "",
            "Stages still training ("
            + time.strftime("%Y-%m-%d", time.gmtime())
            + "): "
            + ", ".join(f"{s} step {p['step']:,} of {p['steps']:,}" for s, p in progress.items())
            + ".",
        ]
    if g is None:
        lines += ["", "Gate: not reached yet (the teacher phase is still training)."]
    else:
        lines += [
            "",
            f"FST chosen on 16 training pairs: {g['fst']} (train Dice "
            + ", ".join(f"{k} {v:.4f}" for k, v in g["fst_choice_train_dice"].items())
            + ").",
            f"Gate (>= +{g['threshold']:.3f} each): FST - {low} = {g['fst_minus_vm_ll']:+.4f}, "
            f"ceiling - {low} = {g['ceiling_minus_vm_ll']:+.4f} (ceiling {g['ceiling_val_dice']:.4f}): "
            + ("**passed**." if g["passed"] else "**failed**: this regime has no recoverable headroom; no student trains."),
        ]
    if g and (g["passed"] or (workdir / "stages" / "ctl_s0").exists()):
        per_pair = {}
        for arm in protocol.ARMS:
            per_pair[arm] = {s: _per_pair(workdir, f"{arm}_s{s}") for s in protocol.SEEDS}
        complete = [s for s in protocol.SEEDS if all(per_pair[a][s] for a in protocol.ARMS)]
        payload["streams_finished"] = complete
        if complete:
            payload["streams"] = _stream_means(per_pair, complete)
            lines += _stream_table(payload["streams"], len(complete) < len(protocol.SEEDS))
        if len(complete) == len(protocol.SEEDS):
            per_pair = {a: {s: per_pair[a][s] for s in complete} for a in protocol.ARMS}
            stats = crd_stats.analyse(per_pair, "ctl", ["crd_paper", "crd_code"], protocol.REFUTE, draws)
            payload["analysis"] = stats
            lines += [
                "",
                "| Arm | CRD - control per stream | mean | t 95% (df 4) | Holm level interval | bootstrap 95% | p (Holm) |",
                "|---|---|---|---|---|---|---|",
            ]
            for arm, r in stats["arms"].items():
                lines.append(
                    f"| {arm} | "
                    + ", ".join(f"{v:+.4f}" for v in r["per_stream"].values())
                    + f" | {r['t']['mean']:+.4f} | [{r['t']['low']:+.4f}, {r['t']['high']:+.4f}] "
                    + (
                        f"| [{r['t_holm']['low']:+.4f}, {r['t_holm']['high']:+.4f}] "
                        if r["holm"].get("reached", True)
                        else "| not reached (Holm stopped at the arm of smaller p) "
                    )
                    + f"| [{r['bootstrap']['low']:+.4f}, {r['bootstrap']['high']:+.4f}] | {r['holm']['p_holm']:.3f} |"
                )
            verdict = (
                "CRD supported: Holm's step-down rejects 'no difference' for a CRD arm above the control (its"
                " Holm-level interval excludes 0 on the positive side)"
                if stats["supported"]
                else "CRD refuted in this regime: both upper bounds below +0.003"
                if stats["refuted"]
                else "inconclusive: no CRD arm is above the control by Holm's test and not both upper bounds are below +0.003"
            )
            if stats["supported"] and stats["refuted"]:  # a real effect, too small to matter by the protocol's bound
                verdict += ", but smaller than +0.003: both upper bounds are below it (the refutation's bound)"
            below = [a for a, r in stats["arms"].items() if r["below_control"]]
            if below:  # the direction, said plainly (not one of the protocol's decisions)
                verdict += f"; {' and '.join(below)} scored below the control (Holm-level t-interval entirely below 0"
                spans_zero = any(stats["arms"][a]["bootstrap"]["high"] >= 0 for a in below)
                verdict += "; the bootstrap, which also resamples the validation subjects, includes 0)" if spans_zero else ")"
            payload["verdict"] = verdict
            lines += ["", f"Verdict: **{verdict}**."]
        else:
            lines += ["", f"Students: {len(complete)} of {len(protocol.SEEDS)} streams finished in every arm."]
    diagnostics = _distill_diagnostics(workdir)
    if diagnostics:
        from crd_jax.training.diagnostics import diagnostics_markdown

        payload["diagnostics"] = diagnostics
        lines += diagnostics_markdown(diagnostics).rstrip("\n").split("\n")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{result_name()}.json", payload)
    write_text(out / f"{result_name()}.md", "\n".join(lines) + "\n")
    write_text(out / f"{result_name()}_summary.md", summary(payload) + "\n")
    return payload


def summary(payload: dict) -> str:
    """A few sentences for the README (``<!-- results: crd_experiment<N>_summary -->``): where the experiment
    got, the gate, and, once every stream finished, each arm's mean difference with its intervals and the
    verdict. Every figure comes from ``payload`` (the report's JSON)."""
    name = protocol.get_config().name
    low = baseline_label()
    g = payload.get("gate")
    head = f"*{name}* (pre-registered in `{payload['protocol']}`): "
    if g is None and not payload.get("started", True):
        return head + "not started."
    going = ", ".join(f"{s} step {p['step']:,} of {p['steps']:,}" for s, p in payload.get("progress", {}).items())
    if g is None:
        evaluated = payload["teacher_phase"]
        finished = payload.get("teacher_finished", list(evaluated))  # older payloads: the evaluated stages only
        done = ", ".join(evaluated[s]["label"] if s in evaluated else s for s in finished) or "nothing yet"
        return head + f"teacher phase under way; finished: {done}" + (f"; training: {going}" if going else "") + "."
    gate = (
        f"gate {'passed' if g['passed'] else 'failed'} (FST - {low} {g['fst_minus_vm_ll']:+.4f}, "
        f"ceiling - {low} {g['ceiling_minus_vm_ll']:+.4f}; threshold +{g['threshold']:.3f})"
    )
    if "analysis" not in payload:
        n = len(payload.get("streams_finished", []))
        students = f"; students: {n} of {len(protocol.SEEDS)} streams finished" + (f"; training: {going}" if going else "")
        return head + gate + (students + "." if g["passed"] else ".")
    arms = payload["analysis"]["arms"]
    parts = [
        f"{arm} - control {r['t']['mean']:+.4f} (t 95% [{r['t']['low']:+.4f}, {r['t']['high']:+.4f}], "
        f"bootstrap [{r['bootstrap']['low']:+.4f}, {r['bootstrap']['high']:+.4f}])"
        for arm, r in arms.items()
    ]
    return head + gate + f"; over {len(protocol.SEEDS)} streams " + ", ".join(parts) + f". **{payload['verdict']}.**"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", type=int, choices=sorted(PROTOCOLS), default=1)
    p.add_argument("--workdir", type=Path, default=None, help="the run folder (default: under ~/crd-runs)")
    p.add_argument("--data-root", default="")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--status", action="store_true")
    p.add_argument("--report", action="store_true", help="write the results files from what finished; train nothing")
    p.add_argument("--draws", type=int, default=10_000, help="bootstrap draws")
    p.add_argument("--steps", type=int, default=0, help="dry runs only: every stage this many steps")
    p.add_argument("--max-pairs", type=int, default=0, help="dry runs only: evaluate on this many pairs")
    p.add_argument("--force-gate", action="store_true", help="dry runs only (with --steps): run the student phase")
    return p


def run_config(args):
    """The config a (resumed) run starts with: the teacher phase; past a passed gate (``gate.json``), the
    teacher phase and the students, since the run folder then records that pipeline and refuses one that drops
    stages (the finished teacher stages are skipped)."""
    saved = saved_gate(args.workdir)
    forced = bool(args.steps and args.force_gate)  # a dry run that forced the student phase resumes into it too
    return _config(args, saved["fst"] if saved and (saved["passed"] or forced) else "")


def restore_shipped_stages(config, workdir: Path, experiment: int, pretrained: Path = ROOT / "crd_jax" / "pretrained") -> list:
    """Copies back into ``workdir`` the finished stages this experiment keeps in the package (ship_models.py's
    ``EXP2_TEACHERS``) where the run folder lacks them, so that a lost run folder does not retrain them; only a
    shipped model whose card matches this config's stage (its recipe, steps and grid) counts. The copies are
    logged in ``restored.json``. Returns the restored stage names."""
    import shutil

    from ship_models import EXP2_RECIPES, EXP2_TEACHERS

    from crd_jax.training import workdir_config

    kept = {2: EXP2_TEACHERS}.get(experiment, {})
    restored = []
    for stage, name in kept.items():
        target, source = workdir / "stages" / stage / "model", pretrained / name
        if stage not in config.pipeline or target.exists() or not (source / "model.json").exists():
            continue
        card = json.loads((source / "model.json").read_text()).get("shipped", {})
        wanted = (EXP2_RECIPES[stage], int(config.stages[stage].steps), list(config.data.resample_shape))
        if (card.get("recipe"), card.get("steps"), card.get("grid")) != wanted:
            continue
        if not (workdir / "config.json").exists():  # a crd-jax workdir before anything goes into it (the pipeline
            workdir.mkdir(parents=True, exist_ok=True)  # refuses a non-empty folder without its config)
            workdir_config.record(config, workdir)
        shutil.copytree(source, target.with_name("model.partial"), dirs_exist_ok=True)
        target.with_name("model.partial").rename(target)  # whole or not at all: the pipeline trusts a model folder
        restored.append(stage)
    if restored:
        log = workdir / "restored.json"
        previous = json.loads(log.read_text()) if log.exists() else []
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        write_json(log, previous + [{"stage": s, "from": f"crd_jax/pretrained/{kept[s]}", "at": stamp} for s in restored])
    return restored


def run(args) -> dict:
    """Teacher phase, gate, student phase (if passed), report; resumes whatever finished. Returns the gate."""
    from crd_jax.ops.conv import bf16_inference
    from crd_jax.training import pipeline

    # float32 throughout, the gate's own network passes included (pipeline.run holds bfloat16 inference off
    # only while its stages run): CRD_JAX_CONV_BF16=1 must not decide a pre-registered gate
    bf16_inference(False)
    config = run_config(args)
    if protocol is lpba40_crd_exp1 and not (args.workdir / "stages" / "vm_h" / "model").exists():
        # VM-H and VM-LL of the main run, as shipped (the protocol's starting point)
        source = shipped_main_run(config, RUNS / "shipped_3d-ll")
        if args.steps:  # a dry run's config differs from the main run's: copy the two model folders as they are
            import shutil

            for stage in ("vm_h", "vm_ll"):
                shutil.copytree(source / "stages" / stage / "model", args.workdir / "stages" / stage / "model")
            write_text(args.workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True))
        else:
            print(f"reused: {', '.join(reuse_stages(config, source, args.workdir)) or 'nothing'}", flush=True)
    experiment = next(k for k, v in PROTOCOLS.items() if v is protocol)
    from crd_jax.training import workdir_config

    # the run folder's lock first (the pipeline takes it again, a no-op in this process): a second invocation on a
    # folder still training must be refused before it plants a model folder the first one would then trip over
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir_config.lock(args.workdir)
    restored = restore_shipped_stages(config, args.workdir, experiment)
    if restored:
        print(f"restored from the package: {', '.join(restored)}", flush=True)
    pipeline.run(config)
    g = gate(config, args.workdir)
    if args.steps and args.force_gate:  # dry runs only: exercise the student phase
        g = dict(g, passed=True)
    print(f"gate: {'passed' if g['passed'] else 'failed'} ({json.dumps(g)})", flush=True)
    if g["passed"]:
        pipeline.run(_config(args, g["fst"]))
    return g


def main():
    args = parser().parse_args()
    select(args.experiment)
    args.workdir = (args.workdir or WORKDIRS[args.experiment]).absolute()
    g = saved_gate(args.workdir)
    if args.status:
        from run_status import print_status

        print_status(_config(args, g["fst"] if g and g["passed"] else ""), args.workdir)
        print(f"gate: {json.dumps(g) if g else 'not reached'}")
        return
    if not args.report:
        run(args)
    report(args.workdir, args.out, args.draws)
    print((args.out / f"{result_name()}.md").read_text())


if __name__ == "__main__":
    from crd_jax.allocator import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc((__file__,))  # training steps as train.py runs them (crd_jax/allocator.py)
    main()

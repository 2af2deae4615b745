"""Quality and bytes of quantized cold tiers (`kv_quant`) against full precision, each setting with exact and with
sparse attention, in one run.

    python benchmarks/quant_quality.py --out benchmarks/results/quant-quality-cpu.json
    python benchmarks/quant_quality.py --contexts 2048 --task-contexts 2048 --depths 0.5      # a quick look
    python benchmarks/quant_quality.py --report benchmarks/results/quant-quality-cpu.json     # tables again

Natural text (`--contexts`, default 2K, 4K and 8K; prose of benchmarks/data as in benchmarks/ruler.py): the prompt
is prefilled, then `--continuation` tokens are teacher-forced one decode step each. Per attention mode and setting:
NLL, and its difference and top-1 agreement against the same attention mode at full precision ("none"; for exact
attention that is DynamicCache's result, bit for bit); host->device bytes per decoded token and peak host bytes,
and their ratio to "none" under the same budgets.

Tasks (`--tasks`, default niah_single, the passkey-style needle; `--task-contexts`, default 4K and 8K; `--depths`):
RULER-style cases from benchmarks/ruler.py, greedy, per attention mode and setting: the score, and whether the
output is the full-precision output of the same mode, token for token.

Budgets as benchmarks/ruler.py: the device holds `--device-fraction` of the KV (full precision), the host 1.5x the KV,
so both runs of a pair hold every page above the disk and move the same pages; what differs is their size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SETTINGS = ("none", "k8v8", "k8v4", "k4v2")
ATTENTION = ("exact", "sparse")


def options(model, tokens: int, attention: str, setting: str, token_budget: float, device_fraction: float) -> dict:
    from sparse_accuracy import budgets

    opts = {"attention": attention, "kv_quant": setting, **budgets(model, tokens, device_fraction)}
    if attention == "sparse":
        opts["token_budget"] = token_budget
    return opts


def natural_rows(model, tokenizer, context: int, settings: list[str], attention: list[str], continuation: int,
                 token_budget: float, device_fraction: float, log, emit) -> None:
    import torch

    from offload import offload
    from ruler import MAX_POSITIONS, natural_ids
    from sparse_accuracy import kv_bytes, teacher_forced

    ctx = min(context, MAX_POSITIONS - continuation)
    text = natural_ids(tokenizer, ctx + continuation, seed=context)
    ids, cont = torch.tensor([text[:ctx]]), torch.tensor(text[ctx:])
    kv = kv_bytes(model, ctx + continuation)
    for mode in attention:
        base = None
        for setting in ["none", *[s for s in settings if s != "none"]]:
            t0 = time.perf_counter()
            with offload(model, **options(model, ctx + continuation, mode, setting, token_budget,
                                          device_fraction)) as rt:
                lp = teacher_forced(model, ids[:, :-1], torch.cat([ids[0, -1:], cont]), rt.cache())[1:]
                s = rt.stats()
            seconds = time.perf_counter() - t0
            nll = float(-lp.gather(1, cont[:, None]).mean())
            h2d = s["bytes_moved"]["host->device"] / max(1, s["tokens"]["decode"])
            host = s["peak_resident_bytes"]["host"]
            if base is None:
                base = {"lp": lp, "nll": nll, "h2d": h2d, "host": host}
            row = {
                "context": context, "tokens": ctx, "attention": mode, "kv_quant": setting,
                "token_budget": token_budget if mode == "sparse" else None,
                "nll": nll, "nll_full": base["nll"], "nll_delta": nll - base["nll"],
                "top1_agreement": float((lp.argmax(-1) == base["lp"].argmax(-1)).float().mean()),
                "h2d_bytes_per_token": h2d, "h2d_over_kv": h2d / kv,
                "h2d_reduction": base["h2d"] / h2d if h2d else None,
                "peak_host_bytes": host, "host_reduction": base["host"] / host if host else None,
                "compression": s["compression"], "bit_exact": s["bit_exact"],
                "decode_tokens": s["tokens"]["decode"], "seconds": seconds,
            }
            emit(row)
            log(f"  natural {ctx} {mode} {setting}: NLL {nll:.4f} ({row['nll_delta']:+.4f}), top-1 "
                f"{row['top1_agreement']:.3f}, h2d/token {h2d / 1e6:.2f} MB (x{_x(row['h2d_reduction'])}), peak host "
                f"{host / 1e6:.1f} MB (x{_x(row['host_reduction'])}) in {seconds:.1f} s")


def task_rows(model, tokenizer, contexts: list[int], tasks: list[str], depths: list[float], settings: list[str],
              attention: list[str], token_budget: float, device_fraction: float, seed: int, log, emit) -> None:
    from offload import offload
    from ruler import generate, make_cases, score

    for context in contexts:
        for case in make_cases(tokenizer, tasks, [context], depths, 1, seed, "chat", True):
            ids = tokenizer(case.prompt, add_special_tokens=False)["input_ids"]
            for mode in attention:
                full = None
                for setting in ["none", *[s for s in settings if s != "none"]]:
                    opts = options(model, len(ids) + case.max_new_tokens, mode, setting, token_budget,
                                   device_fraction)
                    with offload(model, **opts):
                        out, seconds = generate(model, tokenizer, ids, case.max_new_tokens)
                    full = out if full is None else full
                    row = {"case": case.name, "task": case.task, "context": context, "prompt_tokens": len(ids),
                           "depth": case.depth, "expected": case.expected, "attention": mode, "kv_quant": setting,
                           "output": out, "score": score(out, case.expected), "same_as_full": out == full,
                           "seconds": seconds}
                    emit(row)
                    log(f"  {case.name} {mode} {setting}: {row['score']:.2f}"
                        f"{'' if row['same_as_full'] else ' (differs from full precision)'} in {seconds:.1f} s: "
                        f"{out.strip()!r}")


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def summary_markdown(result: dict) -> str:
    from offload.report import markdown_table

    out = [f"Quantized cold tiers, {result['model']}, {result['date']}, {result['machine']}",
           f"`{result['command']}`", ""]
    if result["natural"]:
        out.append("Natural text, teacher-forced; against the same attention at full precision (`none`):")
        out.append("")
        rows = [[str(r["tokens"]), r["attention"], r["kv_quant"], f"{r['nll']:.4f}", f"{r['nll_delta']:+.4f}",
                 f"{r['top1_agreement']:.3f}", f"{r['h2d_bytes_per_token'] / 1e6:.2f}", _x(r["h2d_reduction"]),
                 f"{r['peak_host_bytes'] / 1e6:.1f}", _x(r["host_reduction"])] for r in result["natural"]]
        out.extend(markdown_table(["tokens", "attention", "kv_quant", "NLL", "ΔNLL", "top-1", "h2d MB/token",
                                   "h2d ÷", "peak host MB", "host ÷"], rows))
        out.append("")
    if result["tasks"]:
        out.append("Tasks (greedy): mean score, and cases whose output is full precision's, token for token:")
        out.append("")
        groups: dict[tuple, list[dict]] = {}
        for r in result["tasks"]:
            groups.setdefault((r["context"], r["task"], r["attention"], r["kv_quant"]), []).append(r)
        rows = [[str(c), t, a, q, f"{sum(r['score'] for r in rs) / len(rs):.2f}",
                 f"{sum(r['same_as_full'] for r in rs)}/{len(rs)}"] for (c, t, a, q), rs in groups.items()]
        out.extend(markdown_table(["context", "task", "attention", "kv_quant", "score", "same as none"], rows))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from ruler import TASKS, _ints as ints, add_run_arguments, run_record

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="kv_quant settings (none is always run first)")
    ap.add_argument("--attention", default=",".join(ATTENTION), help="attention modes (default exact,sparse)")
    ap.add_argument("--contexts", default="2048,4096,8192", help="natural-text prompt lengths ('' for none)")
    ap.add_argument("--continuation", type=int, default=32, help="teacher-forced tokens after the prompt")
    ap.add_argument("--tasks", default="niah_single", help="RULER-style tasks (benchmarks/ruler.py)")
    ap.add_argument("--task-contexts", default="4096,8192", help="task prompt lengths ('' for none)")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths")
    ap.add_argument("--token-budget", type=float, default=0.1, help="sparse attention's budget")
    add_run_arguments(ap, "quant-quality.json")
    a = ap.parse_args(argv)
    if a.report:
        print(summary_markdown(json.load(open(a.report))))
        return 0
    settings = [s for s in a.settings.split(",") if s]
    attention = [m for m in a.attention.split(",") if m]
    tasks = [t for t in a.tasks.split(",") if t]
    for s in settings:
        if s not in SETTINGS:
            ap.error(f"--settings: unknown setting {s!r}; known: {', '.join(SETTINGS)}")
    for m in attention:
        if m not in ATTENTION:
            ap.error(f"--attention: expected exact or sparse, got {m!r}")
    for t in tasks:
        if t not in TASKS:
            ap.error(f"--tasks: unknown task {t!r}; known: {', '.join(TASKS)}")

    from offload.models import load_model

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    model, tok = load_model(a.model, progress=False)
    result = {**run_record("benchmarks/quant_quality.py", argv, a.model), "settings": settings, "attention": attention,
              "token_budget": a.token_budget, "device_fraction": a.device_fraction, "natural": [], "tasks": [],
              "interrupted": False}

    def flush() -> None:
        with open(a.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(a.out + ".tmp", a.out)

    def emitter(key: str):
        def emit(row: dict) -> None:
            result[key].append(row)
            flush()
        return emit

    try:
        for context in ints(a.contexts):
            natural_rows(model, tok, context, settings, attention, a.continuation, a.token_budget,
                         a.device_fraction, log, emitter("natural"))
        task_rows(model, tok, ints(a.task_contexts), tasks, [float(d) for d in a.depths.split(",") if d],
                  settings, attention, a.token_budget, a.device_fraction, a.seed, log, emitter("tasks"))
    except KeyboardInterrupt:
        result["interrupted"] = True
        log("interrupted: reporting what ran")
    result["seconds"] = time.perf_counter() - t0
    flush()
    print(summary_markdown(result))
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Every torchvision classification model under every shipped policy: transform,
then one forward + backward + optimizer step + controller step at a small input.

    .venv/bin/python tools/zoo.py [--policies policies/a.yaml ...] [--only NAME ...]
                                  [--results zoo.jsonl] [--json]
    .venv/bin/python tools/zoo.py --table-from zoo.jsonl [--policies ...] [--only ...]

A cell is `ok` (with the transform time), `n/a` when fxcompress refuses the
pair as bad input (the plan's own one-line reason: a rule that matches nothing,
a method that needs blocks the model does not have), `timeout` or `memory` when
the pair ran past --pair-cpu-s CPU seconds or --max-rss-gb resident memory, or
the error class when the run itself failed. Communication-only policies
(`communication:` and no rules) change no graph; they are exercised by
`fxcompress train --nproc 2` and listed here as such.

Models run smallest first (torchvision's parameter count), one worker process
per model (torch is imported once per model, not once per pair), each pair
appended to --results as one JSON line the moment it finishes; a restart
skips the pairs already there, so a cut-off run keeps everything it did.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# this checkout's fxcompress, not whichever one is installed
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torchvision.models as tvm  # noqa: E402

from fxcompress.errors import BadInput  # noqa: E402

STATUSES = ("ok", "n/a", "error", "timeout", "memory")
NOTES_V = 2  # the notes' wording: --backfill-notes redoes records of an older one


def policy_files(root: str = ROOT):
    return sorted(glob.glob(os.path.join(root, "policies", "*.yaml")))


def short_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def communication_only(path: str) -> bool:
    from fxcompress import load_policy
    pol = load_policy(path)
    return not pol.rules and pol.section("communication") is not None


def model_params(name: str) -> int:
    """torchvision's own parameter count (1000 classes) for ordering: no model is built."""
    try:
        return int(next(iter(tvm.get_model_weights(name))).meta["num_params"])
    except Exception:  # a model without published weights goes last
        return 1 << 40


def models_smallest_first(names):
    return sorted(names, key=lambda n: (model_params(n), n))


# ---------------------------------------------------------------- results file

def read_results(path: str) -> list:
    """Every complete JSON line of the file; a line cut off by a kill is ignored."""
    out = []
    if not path or not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and "model" in r and "policy" in r:
                out.append(r)
    return out


def done_pairs(path: str) -> set:
    return {(r["model"], r["policy"]) for r in read_results(path)}


def append_result(path: str, rec: dict) -> None:
    line = json.dumps(rec) + "\n"
    with open(path, "a") as f:  # one write of one line: a kill leaves at most a cut last line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- one pair (worker side)

def unapplied_rules(cm) -> list:
    """The plan's optional rules whose treatment reached no node of this model (CAMP's
    residual-add rule on a network without residual adds, or with adds the pass refuses):
    the pair runs, without that method; the note carries the plan's own reason."""
    plan, notes = cm.plan, []
    for r in plan.policy.rules:
        if not r.optional:
            continue
        for key, v in r.treatments.items():
            matched = [e for e in plan.entries.values() if r.index in e.rules]
            if v is None or any(key in e.treatments for e in matched):
                continue
            where = f"at line {r.line} " if getattr(r, "line", None) else ""
            head = f"{key} applies to no node: the optional rule {where}({r.match.describe()})"
            skipped = [e.skipped[key] for e in matched if key in e.skipped]
            notes.append(f"{head} matches {len(matched)} node(s), the plan skips them all: {skipped[0]}"
                         if skipped else f"{head} matches nothing in this model")
    return notes


def run_pair(name: str, policy: str) -> dict:
    import torch
    import torch.nn.functional as F
    import fxcompress
    from fxcompress.errors import PolicyError, TraceError
    from identity_all import config_for  # same small inputs as the identity check

    kwargs, size = config_for(name)
    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, **kwargs)  # built per policy: no pair sees another's weights
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([0, 1])
    t0 = time.perf_counter()
    try:
        cm = fxcompress.compile(model, policy, example_inputs=x)
    except (PolicyError, BadInput, TraceError) as e:
        return {"status": "n/a", "reason": str(e).splitlines()[0][:200], "input": size}
    transform_s = time.perf_counter() - t0
    opt = torch.optim.SGD(cm.parameters(), lr=0.01, momentum=0.9)
    cm.attach_optimizer(opt)
    cm.train()
    t1 = time.perf_counter()
    out = cm(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    loss = F.cross_entropy(out, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    cm.step()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss {loss.item()}")
    rec = {"status": "ok", "transform_s": round(transform_s, 3),
           "step_s": round(time.perf_counter() - t1, 3), "input": size}
    rec["notes"] = unapplied_rules(cm)  # always present: a record without it predates the check
    rec["notes_v"] = NOTES_V
    return rec


def code_version() -> str:
    """The checkout's commit (+ "-dirty"), so a record says which code produced it."""
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "fxcompress"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def worker(names, policies, results: str) -> int:
    """Run the pairs (model-major) not yet in `results`, appending each as it finishes."""
    import torch
    torch.set_num_threads(1)  # the driver runs one worker at a time on a shared machine
    code = code_version()
    for name in names:
        done = done_pairs(results)
        for p in policies:
            if (name, short_name(p)) in done:
                continue
            t0 = time.perf_counter()
            try:
                r = run_pair(name, p)
            except Exception as e:  # one pair must not hide the others: record the class and go on
                r = {"status": "error", "reason": f"{type(e).__name__}: {e}".splitlines()[0][:240]}
            # the worker's peak resident memory so far: the pair's own when it ran first in its worker
            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB
            r = {"model": name, "policy": short_name(p), **r, "wall_s": round(time.perf_counter() - t0, 2),
                 "code": code, "worker_peak_rss_gb": round(peak_gb, 2)}
            append_result(results, r)
    return 0


def backfill_notes(results: str, log=print) -> int:
    """Ok records written before the notes check: recompute their notes from the plan alone
    (compile with dry_run: trace and plan, nothing rewritten) and append the completed record."""
    import torch
    import fxcompress
    from identity_all import config_for
    n = 0
    for r in read_results(results):
        if r["status"] != "ok" or ("notes" in r and r.get("notes_v") == NOTES_V):
            continue
        path = os.path.join(ROOT, "policies", r["policy"] + ".yaml")
        kwargs, size = config_for(r["model"])
        torch.manual_seed(0)
        model = tvm.get_model(r["model"], weights=None, **kwargs)
        cm = fxcompress.compile(model, path, example_inputs=torch.randn(2, 3, size, size), dry_run=True)
        append_result(results, {**r, "notes": unapplied_rules(cm), "notes_v": NOTES_V})
        n += 1
        log(f"  notes for {r['model']} x {r['policy']}")
    return n


# ---------------------------------------------------------------- driver

def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _proc_rss_gb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / (1 << 20)
    return 0.0


def _mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / (1 << 20)
    return float("inf")


def run_models(names, policies, results: str, pair_cpu_s: float, max_rss_gb: float,
               log=print, min_free_gb: float = 0.0) -> None:
    """Run the pairs of these models not yet in `results` in one worker process (torch imported
    once), restarting it past a pair that timed out, ran out of the memory guard or killed it."""
    if isinstance(names, str):
        names = [names]
    while True:
        done = done_pairs(results)
        todo = [(m, p) for m in names for p in policies if (m, short_name(p)) not in done]
        if not todo:
            return
        models = list(dict.fromkeys(m for m, _ in todo))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", *models, "--results", results,
               "--policies", *policies]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        n_done, cpu_mark, verdict, peak = len(done), 0.0, None, 0.0
        while proc.poll() is None:
            time.sleep(0.5)
            try:
                cpu, rss = _proc_cpu_s(proc.pid), _proc_rss_gb(proc.pid)
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            peak = max(peak, rss)
            n_now = len(done_pairs(results))
            if n_now != n_done:  # a pair finished: its successor's CPU clock starts now
                n_done, cpu_mark = n_now, cpu
            if rss > max_rss_gb:
                verdict = {"status": "memory", "reason": f"resident memory {rss:.1f} GiB over the "
                                                         f"{max_rss_gb:g} GiB guard (--max-rss-gb)"}
            elif _mem_available_gb() < min_free_gb:  # the machine is shared: never push others into the OOM killer
                verdict = {"status": "memory", "reason": f"machine's available memory fell under {min_free_gb:g} GiB "
                                                         f"at {rss:.1f} GiB resident (--min-free-gb)"}
            elif cpu - cpu_mark > pair_cpu_s:
                verdict = {"status": "timeout", "reason": f"over {pair_cpu_s:g} CPU seconds "
                                                          f"(--pair-cpu-s)"}
            if verdict:
                proc.kill()
                break
        _, err = proc.communicate()
        done = done_pairs(results)
        current = next(((m, p) for m, p in todo if (m, short_name(p)) not in done), None)
        if current is None:
            return
        name, current = current
        if verdict is None:  # the worker died without writing its pair (segfault, OOM killer)
            tail = (err or "").strip().splitlines()[-1:] or [""]
            verdict = {"status": "error", "reason": f"worker exited {proc.returncode}: {tail[0][:200]}"}
        append_result(results, {"model": name, "policy": short_name(current), **verdict})
        log(f"  {name} x {short_name(current)}: {verdict['status']}")


def chunks(models, per_worker: int, big: int = 100_000_000):
    """Consecutive groups of at most per_worker models; a big model runs alone (its memory is
    given back when its worker exits)."""
    out, cur = [], []
    for m in models:
        if model_params(m) > big:
            out += [cur] if cur else []
            out.append([m])
            cur = []
            continue
        cur.append(m)
        if len(cur) >= max(1, per_worker):
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


# ---------------------------------------------------------------- table

def cell(r) -> str:
    if r is None:
        return "-"
    s = r["status"]
    if s == "ok":
        return f"ok{'*' if r.get('notes') else ''} {r['transform_s']:.2f}s"
    if s == "error":
        return r["reason"].split(":")[0]
    return s


def table(records, models=None, policies=None, comm=()) -> str:
    from fxcompress.table import format_table
    last = {}
    for r in records:  # a later line for the same pair wins (a rerun after a fix)
        last[(r["model"], r["policy"])] = r
    pols = policies or sorted({p for _, p in last}, key=lambda p: (p != "all", p))
    mods = models or models_smallest_first({m for m, _ in last})
    rows = [[m] + [cell(last.get((m, p))) for p in pols] for m in mods]
    lines = [format_table(["model"] + pols, rows)]
    cells = [last.get((m, p)) for m in mods for p in pols]
    counts = {s: sum(1 for c in cells if c and c["status"] == s) for s in STATUSES}
    for title, keep in (("not applicable (the plan's reason)", ("n/a",)),
                        ("errors", ("error",)), ("timeout / memory guard", ("timeout", "memory"))):
        bad = [c for c in cells if c and c["status"] in keep]
        if bad:
            lines.append(f"\n{title}:")
            lines += [f"  {c['model']} x {c['policy']}: {c['reason']}" for c in bad]
    partial = [c for c in cells if c and c["status"] == "ok" and c.get("notes")]
    if partial:
        lines.append("\nok*: ran, but a method of the policy applies nowhere in this model (the plan):")
        groups = {}  # one line per (policy, reason): the same reason recurs across a model family
        for c in partial:
            for note in c["notes"]:
                groups.setdefault((c["policy"], note), []).append(c["model"])
        lines += [f"  {p}: {note}\n      {', '.join(ms)}" for (p, note), ms in groups.items()]
    not_run = sum(1 for c in cells if c is None)
    lines.append(f"\n{counts['ok']} ok, {counts['n/a']} not applicable, {counts['error']} errors, "
                 f"{counts['timeout']} timeout, {counts['memory']} memory guard, {not_run} not run "
                 f"over {len(cells)} model-policy pairs ({len(mods)} models x {len(pols)} policies)")
    if comm:
        lines.append("communication-only policies (no graph change; run with train --nproc 2): "
                     + ", ".join(comm))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="*", help="policy files (default: every policies/*.yaml)")
    ap.add_argument("--only", nargs="*", help="model names (default: all torchvision classification models)")
    ap.add_argument("--results", default=None,
                    help="JSON-lines file: each finished pair is appended, pairs already there are skipped")
    ap.add_argument("--table-from", default=None, help="print the table of a results file; run nothing")
    ap.add_argument("--pair-cpu-s", type=float, default=900.0, help="CPU seconds one pair may use")
    ap.add_argument("--max-rss-gb", type=float, default=10.0, help="resident memory one worker may use")
    ap.add_argument("--min-free-gb", type=float, default=1.5,
                    help="stop a pair when the machine's available memory falls under this")
    ap.add_argument("--json", action="store_true", help="print the records as one JSON object")
    ap.add_argument("--backfill-notes", action="store_true",
                    help="add the plan's notes to ok records of --results that predate them; run nothing else")
    ap.add_argument("--models-per-worker", type=int, default=8,
                    help="models one worker process runs (models over 100M parameters get one each)")
    ap.add_argument("--worker", nargs="*", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        return worker(args.worker, args.policies, args.results)

    names = args.only or tvm.list_models(module=tvm)
    if args.backfill_notes:
        print(f"{backfill_notes(args.results)} records completed")
        return 0
    if args.table_from:
        if not os.path.exists(args.table_from):
            print(f"zoo: {args.table_from}: no such results file", file=sys.stderr)
            return 2
        pols = [short_name(p) for p in args.policies] if args.policies else None
        records = read_results(args.table_from)
        if args.json:
            json.dump({"results": records}, sys.stdout, indent=1)
            print()
        else:
            print(table(records, models_smallest_first(names) if args.only or pols else None, pols))
        return 0

    policies = args.policies or policy_files()
    graph_policies, comm = [], []
    for p in policies:
        try:
            (comm if communication_only(p) else graph_policies).append(p)
        except BadInput as e:  # a missing or malformed policy: say which, exit 2
            print(f"zoo: {e}", file=sys.stderr)
            return 2
    results = args.results
    tmp = None
    if results is None:  # no file asked for: a throwaway one, so the driver works the same way
        import tempfile
        fd, tmp = tempfile.mkstemp(suffix=".jsonl", prefix="zoo-")
        os.close(fd)
        results = tmp
    log = (lambda s: print(s, file=sys.stderr, flush=True))
    models = models_smallest_first(names)
    try:
        for i, chunk in enumerate(chunks(models, args.models_per_worker)):
            log(f"[{models.index(chunk[0]) + 1}-{models.index(chunk[-1]) + 1}/{len(models)}] {' '.join(chunk)}")
            run_models(chunk, graph_policies, results, args.pair_cpu_s, args.max_rss_gb, log, args.min_free_gb)
        records = [r for r in read_results(results) if r["model"] in set(models)
                   and r["policy"] in {short_name(p) for p in graph_policies}]
    finally:
        if tmp:
            os.unlink(tmp)
    comm_names = [os.path.basename(p) for p in comm]
    if args.json:
        json.dump({"results": records, "communication_only": comm_names}, sys.stdout, indent=1)
        print()
    else:
        print(table(records, models, [short_name(p) for p in graph_policies], comm_names))
    return 1 if any(r["status"] != "ok" and r["status"] != "n/a" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``dse`` command line.

    dse start SPEC            create or resume the study in SPEC and run it to its trial budget
    dse list                  the studies in a storage: model, objectives, trials per state, budget, times
                              (--json: a JSON array, keys in dse.report.study_listing)
    dse status STUDY          trial counts by state, the Pareto table (with full-fidelity results), hypervolume
                              (--json: one JSON object, keys in dse.report.status_dict)
    dse export STUDY --out D  write plan.yaml, accelerator.yaml, hw_report.json, evaluation.json, summary.txt
                              of a trial
                              (--trial N or --pick knee|max-accuracy|min-latency|min-energy, --where,
                              --checkpoint [--format compressed-tensors|dse-packed] for the compressed model)
    dse dashboard             serve the Streamlit Pareto dashboard (reads the storage only)
    dse sensitivity SPEC      proxy loss of compressing one unit at a time, every allowed choice (cached)
    dse evaluate SPEC --plan  compress the model as a plan file says and report proxy and/or lm-eval scores
    dse hwcost ...            the FPGA cost model alone: devices, estimate, calibrate, test (hwcost/cli.py)

A user's mistake (bad spec field, unknown study, missing model) prints one line
``error: <field>: <problem>`` and exits with status 2 without touching storage.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from dse.errors import USER_ERROR, OneLineParser, UserError

DEFAULT_STORAGE = "sqlite:///dse-studies.db"
INTERRUPTED, TERMINATED, BROKEN_PIPE = 130, 143, 141
"""Exit statuses on SIGINT, SIGTERM and a closed stdout pipe: 128 + the signal's number, as a shell reports it."""


class _CurrentStderr(logging.Handler):
    """Log to whatever ``sys.stderr`` is at the time (not the stream of the first call)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _existing_storage(storage: str):
    """Open a storage that holds studies, creating nothing (a missing SQLite file stays missing)."""
    from dse.reader import StorageError, existing_storage

    try:
        return existing_storage(storage)
    except StorageError as err:
        raise UserError(f"--storage: {err}") from None


def _masked(storage: str) -> str:
    """A storage URL as ``dse`` prints it: password masked."""
    from dse.reader import storage_url

    return storage_url(storage).render_as_string(hide_password=True)


def _open_existing(study_name: str, storage: str):
    """Load a stored study without creating anything."""
    import optuna

    storage_obj = _existing_storage(storage)
    names = [s.study_name for s in storage_obj.get_all_studies()]
    if study_name not in names:
        listed = ", ".join(names) if names else "none"
        raise UserError(f"STUDY: '{study_name}' is not in {_masked(storage)}; studies there: {listed}")
    return optuna.load_study(study_name=study_name, storage=storage_obj)


def cmd_start(args) -> int:
    from dse.spec import load_spec
    from dse.study import run_study

    spec = load_spec(args.spec, {"trials": args.trials, "workers": args.workers, "storage": args.storage})
    study = run_study(spec, progress=not args.no_progress)
    print()
    _print_status(study, spec.storage_display)
    return 0


def cmd_list(args) -> int:
    """The studies of ``--storage``: a table, or (``--json``) a JSON array of :func:`dse.report.study_listing`."""
    import json

    from dse.reader import study_overviews
    from dse.report import listing_table, study_listing

    listings = [study_listing(o) for o in study_overviews(_existing_storage(args.storage))]
    if args.json:
        print(json.dumps(listings, indent=1, allow_nan=False))
    elif listings:
        print(listing_table(listings))
    else:
        print(f"no studies in {_masked(args.storage)}")
    return 0


def cmd_status(args) -> int:
    study = _open_existing(args.study, args.storage)
    if args.json:
        import json

        from dse.report import status_dict

        print(json.dumps(status_dict(study, _masked(args.storage)), indent=1, allow_nan=False))
    else:
        _print_status(study, _masked(args.storage))
    return 0


def _print_status(study, storage: str) -> None:
    """The status of ``study`` as read from ``storage`` (the URL given, password masked): header with the budget in
    force (the latest run's), searched fields, trial counts, Pareto table, hypervolume."""
    from dse.identity import budget
    from dse.report import device_label, hardware_line, hypervolume_line, pareto_table, state_counts

    spec = study.user_attrs.get("spec", {})
    trials = study.get_trials(deepcopy=False)
    objectives = ", ".join(f"{o['name']} {o['direction']}" for o in spec.get("objectives", []))
    print(f"study {study.study_name} in {storage}: model {spec.get('model')}, device "
          f"{device_label(spec)}, budget {budget(study.user_attrs)} trials")
    if hardware_line(spec):
        print(f"searched with the plan: {hardware_line(spec)}")
    print("  ".join(f"{k.lower()}={v}" for k, v in state_counts(study).items()))
    print(f"Pareto set ({objectives}):")
    print(pareto_table(study, trials))
    print(hypervolume_line(study, trials))


def cmd_export(args) -> int:
    """Write the chosen trial's bundle (:mod:`dse.export`); a screened-out trial is exported with a warning."""
    from dse.export import choose_trial, export_trial, screened_out

    study = _open_existing(args.study, args.storage)
    trial = choose_trial(study, args.trial, args.pick, args.where)
    written = export_trial(study, trial, Path(args.out), checkpoint=args.checkpoint, progress=_say, force=args.force,
                           checkpoint_format=args.format, verify=not args.no_verify)
    if screened_out(trial):
        print(f"warning: --trial: {screened_out(trial)}", file=sys.stderr)
    for path in written:
        print(path)
    return 0


def cmd_dashboard(args) -> int:
    """Serve the Streamlit app; the storage URL reaches it through ``$DSE_STORAGE`` (not the process list). The
    Streamlit server is a child process: it is stopped whenever this command ends (Ctrl-C, SIGTERM, an error)."""
    if not 0 < args.port < 65536:
        raise UserError(f"--port: {args.port} is not a TCP port (1-65535)")
    storage = _existing_storage(args.storage)
    _check_listen(args.address, args.port)
    app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    command = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
               "--server.address", args.address, "--server.headless", "true",
               "--server.fileWatcherType", "none",  # a served page, not a development session
               "--client.toolbarMode", "viewer", "--browser.gatherUsageStats", "false"]
    shown = storage.engine.url.render_as_string(hide_password=True)
    host = f"[{args.address}]" if ":" in args.address else args.address  # an IPv6 address in a URL
    print(f"dashboard on http://{host}:{args.port} reading {shown}", flush=True)
    server = subprocess.Popen(command, env={**os.environ, "DSE_STORAGE": args.storage})
    try:
        return server.wait()
    finally:
        _stop_child(server)


def _check_listen(address: str, port: int) -> None:
    """A one-line UserError unless a TCP server can listen on ``address:port``: an address that does not resolve
    or is not this machine's is the fault of ``--address``, a port in use or reserved that of ``--port``."""
    import errno
    import socket

    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UserError(f"--address: cannot resolve '{address}': {err.strerror} (give an IP address or host name "
                        "of this machine, e.g. 127.0.0.1)") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Streamlit's server binds
        try:
            probe.bind(sockaddr)
        except OSError as err:
            field = "--port" if err.errno in (errno.EADDRINUSE, errno.EACCES) else "--address"
            raise UserError(f"{field}: cannot listen on {address}:{port}: {err.strerror or err}") from None


def _stop_child(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Ask a child process to exit (SIGTERM), and kill it if it is still running after ``grace_s`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cmd_sensitivity(args) -> int:
    import json

    from tqdm import tqdm

    from dse.spec import load_spec
    from dse.study import prepare
    from evaluators.fidelity import ProxySet
    from evaluators.models import load_model
    from dse.sensitivity import scan, write_plot

    spec = load_spec(args.spec)
    windows = _positive(args.windows, "--windows") or spec.proxy.windows
    seq_len = _positive(args.seq_len, "--seq-len") or spec.proxy.seq_len
    out = Path(args.out or f"sensitivity-{spec.study}")
    setup = prepare(spec)
    _threads(args.threads)  # a bad --threads before minutes of loading
    model, tokenizer = load_model(spec.model)
    proxy = ProxySet.build(tokenizer, windows, seq_len)
    bar = tqdm(desc="sensitivity", unit="choice", disable=args.no_progress)

    def progress(done: int, total: int, row: dict) -> None:
        bar.total = total
        bar.set_postfix_str(f"{row['unit']} {row['choice']} KL {row['kl']:.4f}", refresh=False)
        bar.update(1)

    rows = scan(spec, setup.units, model, tokenizer, proxy, progress, say=lambda m: bar.write(m, file=sys.stderr))
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.json").write_text(json.dumps({"study": spec.study, "model": spec.model,
                                                      "proxy_tokens": proxy.predicted_tokens, "rows": rows},
                                                     indent=1))
    write_plot(rows, out / "sensitivity.html", f"{spec.study}: proxy KL of compressing one unit")
    worst = sorted(rows, key=lambda r: -r["kl"])[: args.top]
    print(f"{len(rows)} unit x choice measurements ({sum(r['source'] == 'cache' for r in rows)} from the cache) "
          f"on {proxy.predicted_tokens} proxy tokens; most sensitive:")
    for r in worst:
        print(f"  {r['unit']:<24} {r['choice']:<26} KL {r['kl']:.4f}  ppl {r['ppl']:.2f}")
    print(f"wrote {out / 'sensitivity.json'} and {out / 'sensitivity.html'}")
    return 0


def cmd_evaluate(args) -> int:
    import json

    from dse.spec import load_spec
    from dse.study import prepare
    from dse.workers import accuracy_of
    from evaluators.compress import PlanApplier, PlanApplyError
    from evaluators.fidelity import ProxySet, dense_reference, full_eval, proxy_eval
    from evaluators.lm import TorchLM
    from evaluators.models import check_weights, load_model
    from evaluators.tasks import task_manager
    from hwcost.cli import check_plan_from, load_plan

    spec = load_spec(args.spec)
    setup = prepare(spec)
    plan = load_plan(args.plan, setup.workload)
    check_plan_from(plan, setup.workload, "--plan", spec.model)
    _threads(args.threads)  # a bad --threads before minutes of loading
    check_weights(spec.model)  # a bad weights file is the one line on stderr, before any progress line
    _say(f"loading model {spec.model}")
    model, tokenizer = load_model(spec.model)
    applier = PlanApplier(model, tokenizer, spec.compression, progress=_say)
    out: dict = {"plan": args.plan}
    windows = f"{_count(spec.proxy.windows, 'window')} of {spec.proxy.seq_len} tokens"
    if args.fidelity in ("proxy", "both"):
        _say(f"proxy: building {windows} and the dense model's reference")
        proxy = ProxySet.build(tokenizer, spec.proxy.windows, spec.proxy.seq_len)
        reference = dense_reference(model, proxy, applier.cache)
    _say(f"applying the plan: {_count(len(plan.layers), 'layer')}"
         + (f", {_count(len(plan.blocks), 'block mixer')}" if plan.blocks else ""))
    try:
        applied = applier.apply(plan)
    except PlanApplyError as err:
        raise UserError(f"--plan: {err}") from None
    out["compression"] = applied.summary()
    if args.fidelity in ("proxy", "both"):
        _say(f"proxy: scoring the compressed model on {windows}")
        out["proxy"] = proxy_eval(model, proxy, reference, applier.dense_output_head()).to_dict()
    if args.fidelity in ("full", "both"):
        lm = TorchLM(model, tokenizer, batch_size=spec.batch_size, disable_tqdm=not sys.stderr.isatty())
        result = full_eval(lm, spec.tasks, task_manager(spec.task_seed, spec.task_paths), progress=_say)
        out["full"] = result.to_dict() | {"accuracy": accuracy_of(result.metrics, spec.tasks)}
    print(json.dumps(out, indent=1))
    return 0


def _say(message: str) -> None:
    """Progress of long steps (loading, calibration passes, MLGRU distillation, each lm-eval task), on stderr."""
    print(message, file=sys.stderr, flush=True)


def _count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: ``1 window``, ``2 windows``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _positive(value, flag: str):
    if value is not None and value < 1:
        raise UserError(f"{flag}: {value} is not a positive integer")
    return value


def _threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        torch.set_num_threads(_positive(threads, "--threads"))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dse", description="Hardware-aware LLM compression search")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{start,list,status,export,dashboard,sensitivity,evaluate,hwcost}")

    p = sub.add_parser("start", help="create or resume the study in SPEC and run it to its budget")
    p.add_argument("spec", help="study spec YAML (see examples/default.yaml)")
    p.add_argument("--trials", type=int, help="override the spec's trial budget")
    p.add_argument("--workers", type=int, help="override the spec's number of Ray evaluator actors")
    p.add_argument("--storage", help="override the spec's storage URL")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("list", help="the studies in a storage",
                       description="One line per study: name, model, objectives and directions, trials per state, "
                                   "budget, creation and last-update times (UTC). --json prints a JSON array of "
                                   "objects with the keys name, model, objectives ([{name, direction}]), trials "
                                   "({complete, running, fail, pruned, waiting}), budget, created, last_update "
                                   "(null where unknown).")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"storage URL (default {DEFAULT_STORAGE})")
    p.add_argument("--json", action="store_true", help="a JSON array instead of the table")
    p.set_defaults(func=cmd_list)

    for name, func, text in (("status", cmd_status, "trial counts and the Pareto table of a study"),
                             ("export", cmd_export,
                              "write a trial's plan, accelerator, hardware report and evaluation")):
        p = sub.add_parser(name, help=text)
        p.add_argument("study", help="study name")
        p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"storage URL (default {DEFAULT_STORAGE})")
        p.set_defaults(func=func)
        if name == "status":
            p.add_argument("--json", action="store_true",
                           help="one JSON object instead of the text: study, storage, model, device, budget, "
                                "objectives, constraints, searched, trials (per state, infeasible), pareto (per "
                                "trial: trial, values, hw_metrics, accelerator, constraints, proxy, full, "
                                "warm_start, plan), full_results, hypervolume ({value, feasible}); null, never NaN")
        if name == "export":
            from dse.export import PICKS
            from dse.plan import CHECKPOINT_FORMATS

            p.add_argument("--out", required=True, help="output directory")
            group = p.add_mutually_exclusive_group()
            group.add_argument("--trial", type=int, help="trial number to export")
            group.add_argument("--pick", default="knee", choices=PICKS, help="which Pareto trial (default knee)")
            p.add_argument("--where", action="append", metavar="COND",
                           help="only trials meeting it, e.g. 'decode_tokens_per_s>=30' (repeatable)")
            p.add_argument("--checkpoint", action="store_true",
                           help="also write the compressed model into OUT/checkpoint (README: Exported models)")
            p.add_argument("--format", choices=CHECKPOINT_FORMATS, default=CHECKPOINT_FORMATS[0],
                           help="checkpoint format: compressed-tensors (transformers/vLLM load it; BitNet for "
                                "ternary plans) or dse-packed (any plan, this package's loader)")
            p.add_argument("--no-verify", action="store_true",
                           help="do not reload a compressed-tensors checkpoint with transformers to compare its "
                                "logits (saves a second copy of the model in memory)")
            p.add_argument("--force", action="store_true",
                           help="replace another trial's bundle in --out (never files that are not a bundle's)")

    p = sub.add_parser("dashboard", help="serve the Streamlit dashboard")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"storage URL (default {DEFAULT_STORAGE})")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("sensitivity", help="proxy loss of compressing one unit at a time (cached)",
                       description="For every unit of SPEC's search space and every choice its group allows, "
                                   "compress that unit alone and measure the proxy (KL, perplexity).")
    p.add_argument("spec", help="study spec YAML")
    p.add_argument("--out", help="output directory (default sensitivity-<study>)")
    p.add_argument("--windows", type=int, help="proxy windows (default: the spec's proxy.windows)")
    p.add_argument("--seq-len", type=int, help="proxy tokens per window (default: the spec's proxy.seq_len)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--top", type=int, default=10, help="most sensitive rows to print")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("evaluate", help="compress the spec's model as a plan says and score it",
                       description="Apply PLAN (a 'dse export' plan.yaml or a ModelPlan mapping) to SPEC's model "
                                   "and print the proxy and/or lm-eval results as JSON.")
    p.add_argument("spec", help="study spec YAML (model, tasks, compression and proxy settings)")
    p.add_argument("--plan", required=True, help="plan YAML")
    p.add_argument("--fidelity", choices=("proxy", "full", "both"), default="proxy")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.set_defaults(func=cmd_evaluate)

    from hwcost.cli import add_hwcost_parser

    add_hwcost_parser(sub)
    return parser


_terminated = False
"""Whether the running command got SIGTERM (:func:`_terminate`)."""


def _terminate(signum, frame) -> None:
    """SIGTERM (``kill``, a service manager, ``docker stop``) unwinds the command as Ctrl-C does, so its ``finally``
    blocks stop what it started (the driver re-queues its interrupted trials, kills its actors and shuts its local
    Ray down; the dashboard stops its Streamlit server). It raises a plain KeyboardInterrupt (Ray's blocking calls
    re-raise any KeyboardInterrupt as a plain one), and :data:`_terminated` tells the two signals apart."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_unwind():
    """While the command runs, SIGTERM is handled by :func:`_terminate` and SIGINT raises KeyboardInterrupt even
    when the process inherited it ignored (a background job of a non-interactive shell, as CI runs one), so both
    stop what the command started; the previous handlers are restored after."""
    global _terminated
    _terminated = False
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit status 0, 1 (evaluations keep failing), 2 (a user mistake, one ``error:`` line),
    130 on SIGINT and 143 on SIGTERM (after the command stopped what it started), 141 when stdout is a pipe whose
    reader went away (``dse status | head``: no traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s",
                        handlers=[_CurrentStderr()], force=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    from dse.driver import EvaluationError

    try:
        with _signals_unwind():
            code = args.func(args)
            sys.stdout.flush()  # a reader that went away shows here, not in the interpreter's flush at exit
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more reaches the closed pipe
        return BROKEN_PIPE
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = "; the study keeps every completed trial" if args.command == "start" else ""
        print(f"{'terminated' if _terminated else 'interrupted'}{kept}", file=sys.stderr)
        return TERMINATED if _terminated else INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

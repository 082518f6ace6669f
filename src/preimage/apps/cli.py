"""The `preimage` command. All printing lives here; the library prints nothing.

    preimage invert MODEL [X.npy] [--codes N]       invert observations (or random codes)
        [--out DIR] [--workers N | --scheduler ADDRESS]   chunk by chunk, resumable, on Dask
    preimage demo [--out DIR]                       the MNIST decoder, exact LP vs Adam
    preimage experiment NAME --runs N --out DIR     a CSV of every run and a PNG figure
    preimage train-mnist --out DIR                  retrain the two shipped VAEs

Imported as `preimage.apps.cli`; the console script ``preimage`` calls `main`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from preimage.api import METHODS, invert
from preimage.apps import experiments as ex
from preimage.apps.demo import RECOVERY_RTOL, run_demo
from preimage.apps.train_mnist import train_and_save
from preimage.model.activations import ACTIVATIONS
from preimage.model.mnist import (
    DEFAULT_EPOCHS,
    N_PIXELS,
    WEIGHT_FILES,
    authors_decoders,
    shipped_decoder,
)
from preimage.model.network import Network
from preimage.results import NORMS, STATUS_MEANING


def _bar(desc: str, total: int | None = None, unit: str = "it",
         resumed: bool = False) -> tuple[tqdm, Callable]:
    """A tqdm bar on stderr and a ``progress(done, total)`` callback that moves it.

    `resumed`: the first call's `done` is work of earlier runs, where the bar
    starts (it does not count towards the rate).
    """
    bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
    first = [resumed]

    def update(done: int, of: int) -> None:
        if first[0]:
            first[0] = False
            bar.reset(total=of)
            bar.initial = bar.n = bar.last_print_n = done
            bar.refresh()
            return
        if bar.total != of:
            bar.total = of
            bar.refresh()
        bar.update(done - bar.n)  # redraws at most every `mininterval` seconds

    return bar, update


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Limit torch and the BLAS libraries to `n` threads for the command.

    On a shared, loaded machine spin-waiting BLAS threads make the small
    matrix products of the LPs many times slower; one thread is the default.
    """
    import torch

    torch.set_num_threads(max(1, n))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=max(1, n)):
        yield


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


# ----------------------------------------------------------------------------- invert

#: Names of the shipped decoders accepted as MODEL.
SHIPPED = {"mnist-relu": "relu", "mnist-leaky": "leaky_relu", "mnist-conv": "conv"}


def _load_model(args: argparse.Namespace) -> Any:
    if args.model in SHIPPED:
        return shipped_decoder(SHIPPED[args.model])
    if str(args.model).endswith(".onnx"):
        return Network.from_onnx(args.model)
    layers = None
    if args.layers is not None:
        layers = [name.strip() for name in args.layers.split(",") if name.strip()]
        if not layers:  # (an empty list would silently mean "every layer")
            raise ValueError(
                f"--layers must name at least one layer, e.g. fc3,fc4; got {args.layers!r}"
            )
    return Network.from_file(
        args.model, layers, activation=args.activation, negative_slope=args.negative_slope
    )


def _load_array(path: str, what: str) -> Any:
    import numpy as np

    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
        if magic != b"\x93NUMPY":  # (else NumPy's message says the file holds a pickle)
            raise ValueError("it is not a .npy file (no NumPy header)")
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {what} from {path}: {exc}") from exc


def _streaming(args: argparse.Namespace) -> bool:
    """Whether the results go to a folder, chunk by chunk (else one .npz at the end)."""
    return args.out is not None and not str(args.out).endswith(".npz")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `invert` that the options ask for."""
    kwargs: dict[str, Any] = {"method": args.method, "rtol": args.rtol}
    if args.noise is not None:
        kwargs.update(noise=args.noise, noise_level=args.noise_level)
    elif args.noise_level is not None:
        raise ValueError("--noise-level needs --noise (linf, l1 or l2)")
    if args.mask is not None:
        kwargs["observe"] = _load_array(args.mask, "the mask")
    return kwargs


def cmd_invert(args: argparse.Namespace) -> int:
    import numpy as np

    try:
        net = _load_model(args)
        z_true = None
        if (args.x is None) == (args.codes is None):
            raise ValueError("give either an observation file X.npy or --codes N")
        if (args.workers is not None or args.scheduler is not None) and not _streaming(args):
            raise ValueError("--workers and --scheduler write a results folder: give --out DIR")
        if args.workers is not None and args.scheduler is not None:
            raise ValueError("give either --workers N (a local cluster) or --scheduler ADDRESS")
        if args.codes is not None:
            if args.codes < 1:
                raise ValueError(f"--codes must be >= 1; got {args.codes}")
            z_true = np.random.default_rng(args.seed).standard_normal(
                (args.codes, net.latent_dim)
            )
            x: Any = net.forward(z_true)
        elif _streaming(args):
            x = args.x  # read chunk by chunk, memory-mapped
        else:
            x = _load_array(args.x, "the observations")
            if x.ndim == 1 or tuple(x.shape) == net.output_shape:
                x = x[None]  # one sample: a batch of one, so every result field is an array
        kwargs = _settings(args)
        if args.out is not None and not _streaming(args):
            _check_writable(Path(args.out))  # before the work, not after it
        if args.time_limit is not None:
            if _streaming(args):
                raise ValueError("--time-limit bounds one call: it needs --out FILE.npz (or no "
                                 "--out), not a results folder")
            kwargs["time_limit"] = args.time_limit
        if _streaming(args):
            return _invert_to_folder(args, net, x, z_true, kwargs)
        bar, update = _bar("inverting", unit="sample")
        try:
            with _threads(args.threads):
                result = invert(net, x, progress=update, **kwargs)
        finally:
            bar.close()
    except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:
        return _fail(exc)

    _summary(args, net, z_true, result.method, result.noise, result.status, result.success,
             result.residual, result.z)
    n = result.status.size
    print(f"time: {result.time:.2f} s ({result.time / n * 1e3:.1f} ms per sample)")
    if args.out is not None:
        out = Path(args.out)
        arrays: dict[str, Any] = {
            "z": result.z, "status": result.status.astype(str), "success": result.success,
            "residual": result.residual, "witness": result.witness,
        }
        if args.noise_level is not None:
            arrays["z_error_bound"] = result.z_error_bound
        if z_true is not None:
            arrays["z_true"] = z_true
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            np.savez(out, **arrays)
        except OSError as exc:
            return _fail(ValueError(f"cannot write --out {out}: {exc.strerror or exc}"))
        print(f"saved: {out.resolve()} ({', '.join(arrays)})")
    return 0


def _check_writable(out: Path) -> None:
    """A ValueError where the results file --out cannot be written (checked before the
    inversion, which may take hours, not after it)."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name ending in .npz")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write --out {out}: {parent} is not a writable folder")


def _fail(exc: BaseException) -> int:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"preimage invert: {message}", file=sys.stderr)
    return 2


def _invert_to_folder(args: argparse.Namespace, net: Network, x: Any, z_true: Any,
                      kwargs: dict[str, Any]) -> int:
    """`preimage.jobs.invert_stream` into the folder --out, here or on a Dask cluster."""
    import numpy as np

    from preimage.jobs import ResultsFolder, dask_client, invert_stream

    bar, update = _bar("inverting", unit="sample", resumed=True)
    options = {"chunk_size": args.chunk_size, "retries": args.retries, "progress": update}
    try:
        try:
            if args.workers is None and args.scheduler is None:
                with _threads(args.threads):
                    report = invert_stream(net, x, args.out, **options, **kwargs)
            else:
                cluster = ({"workers": args.workers} if args.workers is not None
                           else {"scheduler": args.scheduler, "timeout": args.connect_timeout})
                with dask_client(**cluster) as client:
                    report = invert_stream(net, x, args.out, executor=client, **options,
                                           **kwargs)
        finally:
            bar.close()  # before any message: the bar's line is erased
    except (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError,
            ConnectionError) as exc:
        return _fail(exc)
    folder = ResultsFolder(report.folder)
    if z_true is not None:
        np.save(folder.path / "z_true.npy", z_true)
    where = (f"{args.workers} local worker processes" if args.workers is not None
             else f"the cluster at {args.scheduler}" if args.scheduler is not None
             else "this process")
    print(f"results: {folder.path.resolve()} ({report.chunks} chunks of {report.chunk_size} "
          f"samples, on {where})")
    if report.skipped:
        print(f"resumed: {report.skipped} of {report.chunks} chunks were already done "
              f"({report.skipped_samples} samples), skipped")
    status = folder.read_field("status")
    rows = [folder.read_field(name) for name in ("success", "residual", "z")]
    done = folder.done(verify=False)  # (the run just wrote and checked them)
    method = folder.read_chunk(min(done)).method if done else args.method
    _summary(args, net, z_true if report.complete else None, method,
             kwargs.get("noise"), status, *rows)
    rate = (f" ({report.computed_samples / report.seconds:.1f} samples/s)"
            if report.computed else "")
    print(f"time: {report.seconds:.2f} s for {report.computed} chunks{rate}")
    for chunk, error in report.failed.items():
        lo, hi = report.rows(chunk)
        print(f"chunk {chunk} (samples {lo}..{hi - 1}) failed after {args.retries} retries: "
              f"{error}", file=sys.stderr)
    if not report.complete:
        print(f"{report.chunks - report.skipped - report.computed} chunks not done: rerun the "
              "same command to retry them", file=sys.stderr)
        return 1
    return 0


def _summary(args: argparse.Namespace, net: Network, z_true: Any, method: str,
             noise: str | None, status: Any, success: Any, residual: Any, z: Any) -> None:
    """The table of statuses, the answers' misfits and, for --codes, the codes recovered."""
    import numpy as np

    print(f"G: {net}")
    if z_true is not None:
        source = f"{args.codes} codes z ~ N(0, I) (seed {args.seed}), x = G(z)"
    else:
        source = str(args.x)
    print(f"x: {source}; {status.size} sample(s); method {method!r}"
          + (f", noise {noise}" if noise else "")
          + (f" <= {args.noise_level}" if noise and args.noise_level is not None else ""))
    print()
    rows = [[s, int(np.sum(status == s)), STATUS_MEANING.get(s, "")]
            for s in dict.fromkeys(status.tolist())]
    print_table(["status", "samples", "meaning"], rows)
    print()
    success = success.astype(bool)
    print(f"answers (z with its checks passed): {int(success.sum())}/{status.size}")
    if success.any():
        print(f"relative misfit |G(z) - x|_inf / |x|_inf of the answers: median "
              f"{np.median(residual[success]):.2e}, max {np.max(residual[success]):.2e}")
    if z_true is not None:
        z = z.reshape(z.shape[0], -1)
        err = np.linalg.norm(z - z_true, axis=1) / np.linalg.norm(z_true, axis=1)
        err = np.where(np.isfinite(err), err, np.inf)
        print(f"recovered the true code (relative error < 1e-6): "
              f"{int(np.sum(err < 1e-6))}/{status.size}")


# ------------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    bars: list[tqdm] = []

    def progress(stage: str) -> Callable[[int, int], None]:
        for b in bars:
            b.close()
        bar, update = _bar(stage)
        bars.append(bar)
        return update

    with _threads(args.threads):
        report = run_demo(
            args.out, codes=args.samples, digits=args.digits, adam_steps=args.adam_steps,
            restarts=args.restarts, seed=args.seed, progress=progress,
        )
    for b in bars:
        b.close()
    print(f"Decoder: the shipped MNIST VAE's, {report.network}")
    print(f"(a) {args.samples} codes z ~ N(0, I), x = G(z);  "
          f"(b) {args.digits} held-out MNIST digits (not in the range)")
    print(f"Adam: lr 0.01, {args.adam_steps} steps x {args.restarts} restarts, best restart kept")
    print()
    print_table(
        ["part", "method", "recovered z", "median rel. error of z", "G(z_hat) = x",
         "median misfit", "time/sample"],
        [
            [r.part, r.method, _pct(r.recovered), _sci(r.median_error), _pct(r.in_range),
             _sci(r.median_misfit), f"{r.time * 1e3:.1f} ms"]
            for r in report.rows
        ],
    )
    print()
    print(f"exact method verdicts on the codes: {report.verdicts}")
    print(f"recovered: relative error of z below {RECOVERY_RTOL:g};  "
          "misfit: ||G(z_hat) - x|| / ||x||")
    print(f"figure: {report.figure}")
    print(f"total time: {report.seconds:.1f} s")
    return 0


# ------------------------------------------------------------------------- experiment


def _order(value: Any) -> tuple[int, float, str]:
    """Sort numbers by value (10 before 100), then names alphabetically."""
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def cmd_experiment(args: argparse.Namespace) -> int:
    experiment = ex.EXPERIMENTS[args.name]
    runs = args.runs if args.runs is not None else experiment.default_runs
    # bad options: one line and status 2, as for `preimage invert`, before any run
    problem = (f"--runs must be >= 1; got {runs}" if runs < 1
               else f"--adam-steps must be >= 1; got {args.adam_steps}" if args.adam_steps < 1
               else f"--adam-restarts must be >= 1; got {args.adam_restarts}"
               if args.adam_restarts < 1
               else f"--out {args.out} is a file, not a folder" if Path(args.out).is_file()
               else f"--model {args.model} does not exist" if args.model is not None
               and not Path(args.model).exists() else None)
    if problem is None and args.model is not None:
        try:  # (read here, once: a file the experiment cannot use ended in a traceback)
            authors_decoders(args.model)
        except (ValueError, TypeError, KeyError, OSError) as exc:
            problem = f"--model {args.model}: {exc}"
    if problem is not None:
        print(f"preimage experiment: {problem}", file=sys.stderr)
        return 2
    adam = ex.AdamSettings(steps=args.adam_steps, restarts=args.adam_restarts)
    config = ex.Config(runs=runs, seed=args.seed, quick=args.quick, model=args.model, adam=adam)
    out = Path(args.out)
    csv_path = out / f"{args.name}.csv"
    png_path = out / f"{args.name}.png"
    try:
        done = ex.done_keys(csv_path, args.name)
    except ValueError as exc:
        print(f"preimage experiment: {exc}", file=sys.stderr)
        return 2
    if done:
        print(f"{csv_path}: {len(done)} rows already there; computing the missing runs only")
    bar, update = _bar(args.name, unit="run")
    written = 0
    with _threads(args.threads):
        for rows in ex.run_experiment(args.name, config, done=done, progress=update):
            ex.append_rows(csv_path, args.name, rows)
            written += len(rows)
    bar.close()
    rows = [r for r in ex.read_rows(csv_path) if r["run"] < runs and r["seed"] == args.seed]
    ex.figure(args.name, rows, png_path)
    print(f"{args.name}: {experiment.summary}")
    print(f"{written} new rows, {len(rows)} in the figure ({runs} runs per setting, "
          f"seed {args.seed})")
    print()
    by = ["method", *experiment.params] if args.detail else ["method"]
    stats = sorted(ex.summarize(rows, by), key=lambda s: tuple(_order(s[b]) for b in by))
    print_table(
        [*by, "runs", f"error < {ex.SUCCESS_RTOL:g}", "G(z_hat) = x", "median error",
         "median misfit", "p90 misfit", "time/run"],
        [
            [*(s[b] for b in by), s["runs"], _pct(s["success"]), _pct(s["in_range"]),
             _sci(s["median_error"]), _sci(s["median_misfit"]), _sci(s["p90_misfit"]),
             f"{s['time'] * 1e3:.1f} ms"]
            for s in stats
        ],
    )
    print()
    print(f"csv:    {csv_path.resolve()}")
    print(f"figure: {png_path.resolve()}")
    return 0


# ------------------------------------------------------------------------ train-mnist


def cmd_train_mnist(args: argparse.Namespace) -> int:
    epochs = dict(DEFAULT_EPOCHS)
    if args.epochs is not None:
        epochs = {kind: args.epochs for kind in epochs}
    bar, _ = _bar("training", total=sum(epochs.values()), unit="epoch")
    done = [0]

    def progress(epoch: int, n_epochs: int, loss: float) -> None:
        done[0] += 1
        bar.set_postfix(loss=f"{loss:.1f}")
        bar.update(1)

    with _threads(args.threads):
        metrics = train_and_save(args.out, seed=args.seed, epochs=epochs, progress=progress)
    bar.close()
    for kind, m in metrics.items():
        print(
            f"{kind}: {m['epochs']} epochs in {m['train_seconds']:.1f} s, held-out MSE "
            f"{m['test_mse']:.4f} vs constant image {m['constant_mse']:.4f} "
            f"(ratio {m['test_mse'] / m['constant_mse']:.3f}), active pixels "
            f"{m['active_pixels']}/{N_PIXELS} -> {Path(args.out) / WEIGHT_FILES[kind]}"
        )
    print("To ship them, copy the files into src/preimage/models/.")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preimage", description="Invert deep generative models one layer at a time."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def threads(p: argparse.ArgumentParser, default: int) -> None:
        p.add_argument("--threads", type=int, default=default,
                       help=f"torch and BLAS threads (default {default})")

    inv = sub.add_parser(
        "invert", help="invert observations through a generator (or test it on random codes)",
        description="Find z with G(z) = x for every row of X.npy (or for G(z) of random codes) "
        "and say whether it is unique.",
    )
    inv.add_argument("model", help="mnist-relu, mnist-leaky, mnist-conv (shipped decoders), "
                     "an .onnx model, or a .safetensors / .pt / .pth state dict")
    inv.add_argument("x", nargs="?", default=None,
                     help="observations, .npy of shape (n,) or (B, n)")
    inv.add_argument("--codes", type=int, default=None,
                     help="instead of X.npy: invert G(z) of N codes z ~ N(0, I)")
    inv.add_argument("--seed", type=int, default=0, help="seed of --codes (default 0)")
    inv.add_argument("--layers", default=None,
                     help="comma-separated linear layers of G in a state dict, e.g. fc3,fc4")
    inv.add_argument("--activation", default="relu",
                     choices=ACTIVATIONS,
                     help="activation after every layer of a state dict (default relu)")
    inv.add_argument("--negative-slope", type=float, default=0.1, help="for leaky_relu")
    inv.add_argument("--method", default="exact", choices=METHODS)
    inv.add_argument("--noise", default=None, choices=NORMS,
                     help="x = G(z) + e: fit each layer in this norm")
    inv.add_argument("--noise-level", type=float, default=None,
                     help="a bound on ||e|| in that norm (enables error bounds)")
    inv.add_argument("--mask", default=None,
                     help=".npy of booleans, shape (n,): which entries of x are observed")
    inv.add_argument("--rtol", type=float, default=None, help="relative tolerance")
    inv.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                     help="seconds for the whole inversion: samples not done by then are "
                     "'failed' (out of time), the others keep their results")
    inv.add_argument("--out", default=None,
                     help="a results folder, written chunk by chunk as they finish and resumed "
                     "when the command is rerun (X.npy is read memory-mapped); or FILE.npz: "
                     "z, status, witness, ... in one file at the end")
    inv.add_argument("--workers", type=int, default=None,
                     help="run the chunks on a local Dask cluster of N single-threaded processes")
    inv.add_argument("--scheduler", default=None,
                     help="run the chunks on the Dask cluster whose scheduler is at ADDRESS "
                     "(tcp://host:8786; see `dask scheduler`, `dask worker`)")
    inv.add_argument("--chunk-size", type=int, default=None,
                     help="samples per chunk (default: the exact method's working chunk)")
    inv.add_argument("--retries", type=int, default=2,
                     help="reruns of a chunk that raised before it is recorded failed (default 2)")
    inv.add_argument("--connect-timeout", type=float, default=10.0,
                     help="seconds to wait for --scheduler (default 10)")
    threads(inv, 2)
    inv.set_defaults(func=cmd_invert)

    demo = sub.add_parser(
        "demo", help="invert codes and held-out digits through the shipped MNIST ReLU decoder"
    )
    demo.add_argument("--out", default=".", help="folder for the PNG (default: here)")
    demo.add_argument("--samples", type=int, default=50, help="codes z ~ N(0, I) (default 50)")
    demo.add_argument("--digits", type=int, default=16, help="held-out digits (default 16)")
    demo.add_argument("--adam-steps", type=int, default=1000)
    demo.add_argument("--restarts", type=int, default=3, help="Adam restarts (default 3)")
    demo.add_argument("--seed", type=int, default=0)
    threads(demo, 1)
    demo.set_defaults(func=cmd_demo)

    exp = sub.add_parser(
        "experiment",
        help="run one of the paper's experiments: a CSV of every run and a PNG figure",
        description="Experiments: " + "; ".join(
            f"{name}: {e.summary} (default {e.default_runs} runs)"
            for name, e in ex.EXPERIMENTS.items()
        ) + ". Resumable: runs already in DIR/NAME.csv are skipped.",
    )
    exp.add_argument("name", choices=sorted(ex.EXPERIMENTS))
    exp.add_argument("--runs", type=int, default=None, help="runs per setting")
    exp.add_argument("--out", default="out", help="folder for NAME.csv and NAME.png")
    exp.add_argument("--seed", type=int, default=0)
    exp.add_argument("--model", type=Path, default=None,
                     help="the paper authors' decoders (folder), for mnist-decoder")
    exp.add_argument("--quick", action="store_true",
                     help="a small grid and 50 Adam steps from one start (smoke tests)")
    exp.add_argument("--adam-steps", type=int, default=1000)
    exp.add_argument("--adam-restarts", type=int, default=3)
    exp.add_argument("--detail", action="store_true", help="print one line per setting")
    threads(exp, 1)
    exp.set_defaults(func=cmd_experiment)

    train = sub.add_parser("train-mnist", help="train the two MNIST VAEs (seeded, a few minutes)")
    train.add_argument("--out", type=Path, required=True, help="folder for the safetensors files")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epochs", type=int, default=None,
                       help="epochs for both models (default: those of the shipped weights)")
    threads(train, 2)
    train.set_defaults(func=cmd_train_mnist)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of wherever it landed
        print(f"preimage {args.command}: interrupted (a results folder keeps its finished "
              "chunks: rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

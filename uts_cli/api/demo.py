"""``demo``: the whole method on the built-in synthetic dataset, in one call.

prepare (synthetic) -> normalize -> teach -> distill -> eval teacher and student on the clean
test truth. The training settings differ from the paper's defaults on purpose: those assume
ImageNet weights and a GPU; the demo starts from random weights on a laptop CPU, so it uses a
higher learning rate and a fixed number of steps chosen by measurement (see docs/benchmarks.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from uts_cli.config import DistillConfig, EvalConfig, NormalizeConfig, PrepareConfig, TeachConfig
from uts_cli.errors import library_errors
from uts_cli.reporting import NullReporter, Reporter


# Training length per profile; `default` fits in minutes on 2 CPU cores, `full` is for figures.
PROFILES = {
    # 192 cases, 8 x 200 steps, half width: the smallest setting measured at which the student
    # beats its teacher by 0.03 over five seeds (96 and 144 cases fell short), in under 10 minutes
    # on 2 CPU cores (docs/science.md, section 7, "The demo at 192 cases").
    "default": {"patch_size": 128, "width": 32, "epochs": 8, "steps_per_epoch": 200, "batch_size": 32,
                "n_cases": 192},
    # 384 cases, 8 x 400 steps: the smallest size measured at which the teacher scores 0.85 on
    # every seed, the filter removes 90 % of the noisy positives while keeping 80 % of the real
    # ones, and the student beats a teacher trained as long (docs/science.md, section 7,
    # "The full profile at 384 cases").
    "full": {"patch_size": 128, "width": 32, "epochs": 8, "steps_per_epoch": 400, "batch_size": 32, "n_cases": 384,
             "heldout_cases": 40},
}

_DEFAULT = PROFILES["default"]


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("uts-demo")
    seed: int = 0
    patch_size: int = _DEFAULT["patch_size"]
    n_blocks: int = 2
    # Channels of the network's first stage (64: ResNet-18's). At 32 the network has 28 % of the
    # multiply-adds and trains 2.7 times as many samples a second on a CPU; at the same steps
    # it localizes as well, so the demo spends the time on more cases and steps
    # (docs/science.md, section 7, "The demo since 2026-12-03").
    width: int = _DEFAULT["width"]
    epochs: int = _DEFAULT["epochs"]
    steps_per_epoch: int = _DEFAULT["steps_per_epoch"]
    batch_size: int = _DEFAULT["batch_size"]
    lr: float = 1e-3
    pixel_threshold: str = "localization"
    criterion: str = "TP"
    device: str = "auto"
    workers: int = 1
    profile: str = "default"
    # Cases of the rendered synthetic dataset (4 fields of 512 px each; splits are per case).
    n_cases: int = _DEFAULT["n_cases"]
    # Test cases of a separate rendered test set teacher and student are scored on (the same set
    # for every seed, so seeds compare on the same fields; 20 cases = 80 fields); 0 scores them
    # on the dataset's own test cases, which differ from seed to seed (a sixth of n_cases).
    heldout_cases: int = 20
    # More SyntheticSpec options for the rendered dataset (its look: stain_spread, nucleus_density,
    # lookalikes_per_field, ...); given ones name the dataset and stores apart (see _look_suffix).
    dataset_options: dict = field(default_factory=dict)
    # More TeachConfig fields for the teacher (the student inherits them); by default the options
    # the seed studies of docs/science.md chose for the demo.
    teach_options: dict = field(default_factory=lambda: dict(DEMO_TEACH_OPTIONS))


# Warm-up + cosine, AdamW with weight decay, an EMA of the weights, BN re-estimation before validation.
STABILITY_OPTIONS = {"lr_schedule": "warmup-cosine", "optimizer": "adamw", "weight_decay": 0.05,
                     "ema_decay": 0.99, "bn_reestimate": 8}
# The demo teacher's options beyond the method's defaults: the stability options; the l2
# location constraint, which ties the CAM's soft centroid to the annotated mitosis and so keeps
# the random-init CAM from peaking beside it (docs/science.md, sections 3 and 5); and trimming
# the quarter of each batch's positives the teacher contradicts most, which raised both teacher
# and student on a held-out test set over 7 seeds (docs/science.md, section 9).
DEMO_TEACH_OPTIONS = {**STABILITY_OPTIONS, "location": "l2", "trim_positives": 0.25}

# Renderer seed of the held-out test set: one set for every demo seed, the one the study's
# held-out figures use (benchmarks/heldout_eval.py).
HELDOUT_GENERATOR_SEED = 1000


def profile_config(profile: str, **given) -> "DemoConfig":
    """A DemoConfig with the profile's training length; ``given`` fields (not None) take precedence.

    Raises:
        UsageError: unknown profile.
    """
    from uts_cli.errors import UsageError

    if profile not in PROFILES:
        raise UsageError(f"unknown demo profile {profile!r}", hint=f"use one of {', '.join(PROFILES)}")
    values = {**PROFILES[profile], **{k: v for k, v in given.items() if v is not None}}
    return DemoConfig(profile=profile, **values)


@dataclass
class DemoResult:
    workdir: Path
    store: Path
    teacher: dict
    student: dict
    distill: dict
    seconds: float
    steps: dict = field(default_factory=dict)
    # What teacher and student were scored on: store, split, cases, fields, mitoses.
    test_set: dict = field(default_factory=dict)


def _eval_summary(result) -> dict:
    return {"run": str(result.run), "threshold": result.threshold, "region": result.region,
            "patch": result.patch, "image_level": result.image_level}


@library_errors
def demo(cfg: DemoConfig, reporter: Reporter | None = None) -> DemoResult:
    """Run the full UTS pipeline on the synthetic dataset and compare teacher and student.

    Every step writes into ``cfg.workdir``; rerunning reuses the dataset and stores that are
    already there and trains the two runs afresh.
    """
    from uts_cli.api.distill import distill
    from uts_cli.api.evaluate import evaluate
    from uts_cli.api.teach import teach
    reporter = reporter or NullReporter()
    t0 = time.monotonic()
    work = Path(cfg.workdir)
    steps: dict[str, float] = {}

    def step(name: str):
        steps[name] = round(time.monotonic() - t0 - sum(steps.values()), 2)

    norm = demo_store(cfg, reporter, step)
    runs = work / "runs"
    teacher_name, student_name = f"teacher-s{cfg.seed}", f"student-s{cfg.seed}"
    reporter.log("3/5 teach: weakly supervised teacher from random weights")
    teach(teacher_config(cfg, norm, teacher_name, runs), reporter)
    step("teach")
    reporter.log("4/5 distill: filter the teacher's disagreements, train the student")
    d = distill(DistillConfig(teacher=runs / teacher_name, name=student_name, runs_dir=runs,
                              criterion=cfg.criterion, device=cfg.device, workers=cfg.workers,
                              overwrite=True), reporter)
    step("distill")
    if cfg.heldout_cases > 0:
        reporter.log(f"5/5 eval: teacher and student on a held-out test set ({cfg.heldout_cases} cases), clean truth")
        test_store = heldout_test_store(work, norm, cfg.heldout_cases, cfg.patch_size, cfg.dataset_options,
                                        _heldout_seed(cfg.seed), cfg.device, reporter)
        step("render held-out test set")
    else:
        reporter.log("5/5 eval: teacher and student on the dataset's test split, clean truth")
        test_store = norm
    results = {}
    for who, name in (("teacher", teacher_name), ("student", student_name)):
        output = runs / name / "eval-heldout" if cfg.heldout_cases > 0 else None
        results[who] = _eval_summary(evaluate(EvalConfig(run=runs / name, store=test_store, split="test",
                                                         truth="auto", output=output, device=cfg.device), reporter))
    step("eval")
    distill_summary = {k: v for k, v in d.__dict__.items() if k != "student"}
    test_set = test_set_summary(test_store, held_out=cfg.heldout_cases > 0)
    if cfg.heldout_cases > 0:
        test_set["generator_seed"] = _heldout_seed(cfg.seed)   # what renders the same set again
    return DemoResult(workdir=work, store=norm, teacher=results["teacher"], student=results["student"],
                      distill=distill_summary, seconds=round(time.monotonic() - t0, 2), steps=steps,
                      test_set=test_set)


def _heldout_seed(seed: int) -> int:
    """The held-out set's renderer seed; never the training dataset's own."""
    return HELDOUT_GENERATOR_SEED if seed != HELDOUT_GENERATOR_SEED else HELDOUT_GENERATOR_SEED + 1


def test_set_summary(path: Path, held_out: bool) -> dict:
    """What a store's test split holds: cases, fields and (with a clean truth) mitoses."""
    import numpy as np

    from uts_cli.io.store import PatchStore

    store = PatchStore(path)
    images = np.unique(store.image_idx[store.indices("test")])
    mitoses = (sum(len(store.image_points(int(i), truth=True)) for i in images) if store.has_truth else None)
    return {"store": str(path), "split": "test", "held_out": held_out,
            "cases": len({str(store.image_case[i]) for i in images}),
            "fields": int(len(images)), "mitoses": mitoses}


def heldout_set_name(n_cases: int, looks: dict | None = None, generator_seed: int = HELDOUT_GENERATOR_SEED) -> str:
    """The held-out dataset's name, e.g. ``heldout-g1000-c40``; its stores add ``-p<patch size>``."""
    return f"heldout-g{generator_seed}-c{n_cases}{_look_suffix(looks or {})}"


def heldout_test_store(work: Path, like: Path, n_cases: int, patch_size: int, looks: dict | None = None,
                       generator_seed: int = HELDOUT_GENERATOR_SEED, device: str = "auto",
                       reporter: Reporter | None = None) -> Path:
    """A separate rendered test set of ``n_cases`` cases, normalized like the training store ``like``.

    The renderer needs a train and a val case, so the dataset holds ``n_cases + 2`` cases; only its
    test split is meant to be scored. It is normalized with ``like``'s fitted stain state
    (``normalize --like``), so a model sees it in the colours it trained on. Both stores are
    reused when complete.

    Returns:
        The normalized held-out store's path (under ``work/stores``).
    """
    from uts_cli.api.normalize import normalize
    from uts_cli.api.prepare import prepare

    reporter = reporter or NullReporter()
    looks = looks or {}
    name = heldout_set_name(n_cases, looks, generator_seed)
    raw = work / "stores" / f"{name}-p{patch_size}.h5"
    if not _complete(raw):
        options = {"seed": generator_seed, "n_cases": n_cases + 2, "val_cases": 1, "test_cases": n_cases, **looks}
        prepare(PrepareConfig(dataset="synthetic", root=work / "datasets" / name, output=raw, patch_size=patch_size,
                              compression="lzf", overwrite=True, dataset_options=options), reporter)
    out = raw.with_name(f"{raw.stem}-like-{Path(like).stem}.h5")
    # Reused only while it still carries the training store's stain state (a training store
    # rendered again under the same name gets its held-out copy normalized again).
    state = _stain_state(out)
    if state is None or state != _stain_state(Path(like)):
        normalize(NormalizeConfig(store=raw, output=out, like=Path(like), device=device, overwrite=True), reporter)
    return out


def demo_store(cfg: DemoConfig, reporter: Reporter | None = None, step=None) -> Path:
    """Render, tile and normalize the seed's synthetic dataset under ``cfg.workdir`` (reused when complete).

    Returns:
        The normalized store's path.
    """
    from uts_cli.api.normalize import normalize
    from uts_cli.api.prepare import prepare

    reporter = reporter or NullReporter()
    work = Path(cfg.workdir)
    own = sorted({"seed", "n_cases"} & set(cfg.dataset_options))
    if own:
        from uts_cli.errors import UsageError

        raise UsageError(f"demo: dataset_options may not set {', '.join(own)}",
                         hint="use the DemoConfig fields seed and n_cases instead")
    cases = _case_options(cfg.n_cases)
    size = f"-c{cfg.n_cases}" if cases else ""   # the renderer's default size keeps the old names
    name = f"synthetic-s{cfg.seed}{size}{_look_suffix(cfg.dataset_options)}"
    raw = work / "stores" / f"{name}-p{cfg.patch_size}.h5"
    norm = raw.with_name(raw.stem + "-norm.h5")
    if not _complete(raw):
        reporter.log("1/5 prepare: rendering and tiling the synthetic dataset")
        prepare(PrepareConfig(dataset="synthetic", root=work / "datasets" / name, output=raw,
                              patch_size=cfg.patch_size, compression="lzf", overwrite=True,
                              dataset_options={"seed": cfg.seed, **cases, **cfg.dataset_options}), reporter)
    if step:
        step("prepare")
    if not _complete(norm):
        reporter.log("2/5 normalize: histogram matching + Macenko")
        normalize(NormalizeConfig(store=raw, output=norm, device=cfg.device, overwrite=True), reporter)
    if step:
        step("normalize")
    return norm


def _case_options(n_cases: int) -> dict:
    """Synthetic-dataset options for ``n_cases`` cases: val and test each get a sixth of them (at least 2)."""
    from uts_cli.datasets.synthetic import SyntheticSpec

    if n_cases == SyntheticSpec.n_cases:
        return {}
    held_out = max(2, n_cases // 6)
    return {"n_cases": n_cases, "val_cases": held_out, "test_cases": held_out}


# Short names of the dataset options in store and dataset folder names, in the order they appear.
_LOOK_TAGS = {"stain_spread": "stain", "nucleus_density": "nuc", "lookalikes_per_field": "look"}


def _look_suffix(options: dict) -> str:
    """A name suffix that tells the given dataset options apart, e.g. ``-stain2-nuc1.5-look5``.

    The three look options come first, in a fixed order and under short tags; any other option
    follows sorted by name. Empty when no option is given, so the default names do not change.
    """
    given = {k: v for k, v in options.items() if v is not None}
    keys = [k for k in _LOOK_TAGS if k in given] + sorted(k for k in given if k not in _LOOK_TAGS)
    return "".join(f"-{_LOOK_TAGS.get(k, k.replace('_', '-'))}{_format_value(given[k])}" for k in keys)


def _format_value(value) -> str:
    """``2.0`` -> ``2``, ``1.5`` -> ``1.5``: the shortest spelling that reads back the same."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def teacher_config(cfg: DemoConfig, store: Path, name: str, runs: Path, **changes) -> TeachConfig:
    """The demo's teacher settings (random init, the demo's length and lr, plus ``cfg.teach_options``)."""
    base = dict(store=store, name=name, runs_dir=runs, n_blocks=cfg.n_blocks, width=cfg.width, weights="none",
                epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch, batch_size=cfg.batch_size,
                lr=cfg.lr, pixel_threshold=cfg.pixel_threshold, seed=cfg.seed, workers=cfg.workers,
                device=cfg.device, overwrite=True)
    base.update(cfg.teach_options)
    base.update(changes)
    return TeachConfig(**base)


def _stain_state(path: Path) -> dict | None:
    """A store's fitted stain state; None when the store is missing, incomplete or not normalized."""
    opened = _open_complete(path)
    return None if opened is None else opened.stain_state


def _complete(path: Path) -> bool:
    return _open_complete(path) is not None


def _open_complete(path: Path):
    """The store at ``path``, or None when it is missing or not a complete store."""
    from uts_cli.errors import InputDataError
    from uts_cli.io.store import PatchStore

    if not path.exists():
        return None
    try:
        return PatchStore(path)
    except InputDataError:
        return None

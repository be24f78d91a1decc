"""Inference speed of the zero-shot segmenters side by side, and evaluate's end-to-end rate against
the bare model forward. In one run.

    .venv/bin/python benchmarks/bench_fps.py                        # tiny CLIP, CPU (a smoke run)
    .venv/bin/python benchmarks/bench_fps.py --clip ViT-B-16 --device cuda --size 512

(a) ``models``: the bare ``forward(images, text_embeddings)`` of every method on the same images
    (real coco128 photographs resized to ``--size`` x ``--size``), the same CLIP backbone
    (``--clip``, random weights: speed does not depend on the values), the same resolution, batch
    size (``--batch-size``, default 1 as DeOP's speed test) and class vocabulary (the 171
    COCO-Stuff names, random L2-normalised text embeddings; DeOP embeds its learnable prompts
    once before timing, as evaluate does). Each model is built directly from its class with the
    model section of the config named in ``MODEL_CONFIGS`` (the sample configs for the tiny CLIP,
    the COCO-Stuff benchmark configs for a real one), ``input_size`` set to ``--size``:

    - ``maskclip``: training-free dense CLIP (one pass);
    - ``zegclip``: deep-prompted CLIP + mask decoder (one pass);
    - ``zegformer_seg``: the proposal MaskFormer alone (ZegFormer's segment classifier);
    - ``zegformer``: the fused ZegFormer (proposals + 100 masked crops through CLIP: two-stage);
    - ``deop``: proposals + one CLIP pass with patch severance + heatmap decoder.

    Images are normalised for each model beforehand; a timed pass is ``--batches`` batches of
    ``forward`` only (``torch.inference_mode``; ``torch.cuda.synchronize`` before the clock stops
    on GPU), after ``--warmup`` untimed batches; the passes of all models are interleaved
    ``--repeats`` times (so machine load hits them alike) and the median pass is reported, in
    images/s and as the ratio to the fused ``zegformer`` (ZegCLIP Table 3: about 5x over
    ZegFormer; DeOP Sec. 4.3 / Table 6: 3-7x over the multi-pass baseline).

(b) ``evaluate``: the real sample pipeline (``pipeline/run.py --config --e2e-config``, default
    ``configs/sample.yaml``: MaskCLIP) in a fresh work directory, then the bare forward of the
    *same* segmenter artifact on the *same* eval-set images at evaluate's resolution and batch
    size (per set with that set's text embeddings, images decoded and normalised beforehand).
    Ratios: evaluate's timed images/s (``fps.json`` ``overall``: host arrays -> confusion
    matrices) and its end-to-end images/s (``end_to_end``: manifest read, actor start-up, model
    load, decoding) over the bare forward's. What separates them is the cost of decoding,
    resizing, upsampling to label size and counting.

Prints tables and one JSON line. Never asserted in tests. Methods whose model module is missing
are reported as not available.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("ZEROSEG_DATA", REPO.parent / "shared" / "data"))
os.environ.setdefault("ZEROSEG_DATA", str(DATA))  # the benchmark configs read it (only their model sections are used)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from zeroseg.config.clip import TINY_MODEL  # noqa: E402
from zeroseg.data.builtin_splits import COCO_STUFF_171  # noqa: E402

#: The fused ZegFormer: every ratio is relative to it.
BASELINE = "zegformer"
#: Configs whose model sections the models are built with: (tiny CLIP, real CLIP).
MODEL_CONFIGS = {
    "zegclip": ("configs/sample_zegclip.yaml", "configs/coco_stuff_zegclip.yaml"),
    "zegformer": ("configs/sample_zegformer.yaml", "configs/coco_stuff_zegformer.yaml"),
    "deop": ("configs/sample_deop.yaml", "configs/coco_stuff_deop.yaml"),
}
ORDER = ("maskclip", "zegclip", "zegformer_seg", "zegformer", "deop")


# -- inputs ------------------------------------------------------------------------------------
def load_images(n: int, size: int) -> torch.Tensor:
    """The first ``n`` coco128 images (sorted), RGB in [0, 1], resized (bilinear, antialiased)
    to ``size`` x ``size``: float ``[n, 3, size, size]`` on the CPU."""
    files = sorted((DATA / "coco128-seg" / "images" / "train2017").glob("*.jpg"))[:n]
    if len(files) < n:
        raise SystemExit(f"need {n} images in {DATA}/coco128-seg/images/train2017, found {len(files)}")
    out = []
    for f in files:
        x = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append(F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out)


def text_embeddings(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Random L2-normalised ``[n, dim]`` rows (fixed seed): speed does not depend on the values."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1)


def config_sections(method: str, tiny: bool) -> tuple[dict[str, Any], str]:
    """``(raw sections, file)`` of the method's config in :data:`MODEL_CONFIGS` (``({}, reason)``
    when the file is not in this tree)."""
    path = REPO / MODEL_CONFIGS[method][0 if tiny else 1]
    if not path.is_file():
        return {}, f"{path.relative_to(REPO)} missing: model defaults"
    return dict(load_config(path).sections), str(path.relative_to(REPO))


def model_section(method: str, tiny: bool) -> tuple[dict[str, Any], str]:
    """``train_classifier.model`` (raw) of the method's config, and where it came from."""
    sections, where = config_sections(method, tiny)
    return dict((sections.get("train_classifier") or {}).get("model") or {}), where


# -- the models --------------------------------------------------------------------------------
def proposals_doc(
    clip: Any, clip_spec: dict[str, Any], tiny: bool, size: int, work: Path
) -> tuple[dict[str, Any], str]:
    """A ``proposals.json`` document as pretrain_proposals writes it, for a MaskFormer built (random
    weights) with the ``pretrain_proposals.model`` section of the ZegFormer config, trained on the
    156 seen COCO-Stuff classes with a ``size`` x ``size`` crop. Shared by ZegFormer and DeOP."""
    from zeroseg.data.classes import resolve_split
    from zeroseg.models.proposals import MaskFormer, read_proposals_json, save_proposals

    sections, where = config_sections("zegformer", tiny)
    cfg = dict((sections.get("pretrain_proposals") or {}).get("model") or {})
    seen = list(resolve_split(COCO_STUFF_171, dataset="coco_stuff", builtin="coco_stuff171").seen)
    backbone_clip = cfg.get("backbone") == "clip"
    dim = int(clip.visual.output_dim)
    m = MaskFormer(
        cfg,
        num_classes=len(seen),
        text_dim=dim if cfg.get("class_head", "text") == "text" else None,
        clip_visual=clip.visual if backbone_clip else None,
        load_backbone_weights=False,  # random weights: speed does not depend on them
    )
    save_proposals(work, m, seen=seen, input_size=[size, size], clip_spec=clip_spec if backbone_clip else None)
    return read_proposals_json(work), where


def build_models(clip_spec: dict[str, Any], size: int, device: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``({name: segmenter on device, eval mode}, {name: where its model section came from, or
    why it is not available})``."""
    from zeroseg.models.clip import load_clip
    from zeroseg.models.maskclip import MaskCLIP
    from zeroseg.models.zegclip import ZegCLIP

    tiny = clip_spec["model"] == TINY_MODEL
    models: dict[str, Any] = {}
    notes: dict[str, str] = {}
    models["maskclip"] = MaskCLIP(load_clip(clip_spec), {"input_size": [size, size]})
    notes["maskclip"] = "MaskCLIP defaults"
    zc, notes["zegclip"] = model_section("zegclip", tiny)
    models["zegclip"] = ZegCLIP(load_clip(clip_spec), {**zc, "input_size": [size, size]})
    have = {n: importlib.util.find_spec(f"zeroseg.models.{n}") is not None for n in ("zegformer", "deop")}
    if not any(have.values()):
        for n in ("zegformer_seg", "zegformer", "deop"):
            notes[n] = "not available: its model module is not in this tree"
        return {k: m.to(device).eval() for k, m in models.items()}, notes
    with tempfile.TemporaryDirectory(prefix="zeroseg-bench-proposals-") as work:
        clip = load_clip(clip_spec)
        doc, pwhere = proposals_doc(clip, clip_spec, tiny, size, Path(work))
    seen = doc["seen"]
    if have["zegformer"]:
        from zeroseg.models.zegformer import ZegFormer

        zf, where = model_section("zegformer", tiny)
        for name, branch in (("zegformer_seg", False), ("zegformer", True)):
            try:
                models[name] = ZegFormer(load_clip(clip_spec), {**zf, "image_branch": branch, "proposals": doc})
                notes[name] = f"{where} (proposals: {pwhere})"
            except Exception as e:  # noqa: BLE001 - report and go on with the others
                notes[name] = f"not available: {type(e).__name__}: {e}"
    else:
        notes["zegformer_seg"] = notes["zegformer"] = "not available: zeroseg/models/zegformer.py not in this tree"
    if have["deop"]:
        from zeroseg.models.deop import DeOP

        dc, where = model_section("deop", tiny)
        if not dc and tiny:  # no sample config yet: the released decoder, narrowed to the tiny CLIP's width
            dim = int(load_clip(clip_spec).visual.output_dim)
            dc = {"width": dim, "heads": 2, "ffn": 2 * dim, "visual_prompt_layers": [0, 1], "visual_prompt_size": size}
            where += " (narrowed to the tiny CLIP: width, heads, ffn, prompt layers)"
        try:
            models["deop"] = DeOP(load_clip(clip_spec), {**dc, "input_size": [size, size], "proposals": doc})
            notes["deop"] = f"{where} (proposals: {pwhere})"
        except Exception as e:  # noqa: BLE001
            notes["deop"] = f"not available: {type(e).__name__}: {e}"
    else:
        notes["deop"] = "not available: zeroseg/models/deop.py not in this tree"
    for name in ("zegformer_seg", "zegformer"):
        if name in models:  # the seen rows ZegFormer fuses differently (Eq. 3): evaluate's default path
            models[name].seen_fill = seen
    return {k: m.to(device).eval() for k, m in models.items()}, notes


class Runner:
    """One model's timed call: normalised batches prepared once, ``forward`` only in the clock."""

    def __init__(self, name: str, seg: Any, images: torch.Tensor, text: torch.Tensor, batch: int, device: str):
        self.name, self.seg, self.device = name, seg, torch.device(device)
        mean = torch.tensor(seg.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(seg.std, dtype=torch.float32).view(1, 3, 1, 1)
        x = ((images - mean) / std).to(self.device)
        self.batches = [x[i : i + batch] for i in range(0, len(x), batch) if len(x[i : i + batch]) == batch]
        self.text = text.to(self.device)
        seen = getattr(seg, "seen_fill", None)
        if seen is not None:  # ZegFormer recognises the seen classes by their text rows (seen_from_text)
            seg.seen_text = self.text[torch.as_tensor(seen, device=self.device)].clone()
        if getattr(seg, "encodes_text", False):  # DeOP: learnable prompts, embedded once per set (as evaluate)
            with torch.inference_mode():
                self.text = seg.encode_text(list(COCO_STUFF_171)).to(self.device)
        self.call: Callable[[torch.Tensor], Any] = lambda b: seg(b, self.text)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, batches: list[torch.Tensor]) -> float:
        """Seconds for ``forward`` over ``batches`` (synchronised)."""
        with torch.inference_mode():
            self.sync()
            t0 = time.perf_counter()
            for b in batches:
                self.call(b)
            self.sync()
            return time.perf_counter() - t0


def bench_models(args: argparse.Namespace) -> dict[str, Any]:
    spec = {"model": args.clip, "random_init": True}
    models, notes = build_models(spec, args.size, args.device)
    need = args.batches * args.batch_size
    images = load_images(need, args.size)
    text = text_embeddings(len(COCO_STUFF_171), int(models["maskclip"].embed_dim))
    runners = {n: Runner(n, m, images, text, args.batch_size, args.device) for n, m in models.items()}
    for r in runners.values():  # warm-up (allocator, cuDNN autotuning, lazy init)
        r.run(r.batches[: max(args.warmup, 0)])
    times: dict[str, list[float]] = {n: [] for n in runners}
    peak: dict[str, int | None] = {n: None for n in runners}
    for _ in range(args.repeats):
        for n, r in runners.items():
            if r.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(r.device)
            times[n].append(r.run(r.batches))
            if r.device.type == "cuda":
                peak[n] = max(peak[n] or 0, torch.cuda.max_memory_allocated(r.device))
    n_img = len(images)
    rows = []
    base = statistics.median(times[BASELINE]) if BASELINE in times else None
    for n in ORDER:
        if n not in times:
            rows.append({"model": n, "available": False, "why": notes.get(n, "not available: not built")})
            continue
        med = statistics.median(times[n])
        rows.append(
            {
                "model": n,
                "available": True,
                "images_per_s": n_img / med,
                "ms_per_image": 1000 * med / n_img,
                "median_pass_s": med,
                "min_pass_s": min(times[n]),
                "best_images_per_s": n_img / min(times[n]),
                "x_vs_zegformer": (base / med) if base else None,
                "peak_gpu_mib": peak[n] / 2**20 if peak[n] is not None else None,
                "params_m": sum(p.numel() for p in models[n].parameters()) / 1e6,
                "config": notes.get(n),
            }
        )
    return {"images": n_img, "rows": rows}


# -- (b) evaluate against the bare forward ---------------------------------------------------------
def bench_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the pipeline on the sample data, then time the bare forward of its segmenter."""
    from pipeline.catalogue import load_catalogue
    from pipeline.plan import plan
    from pipeline.store import ArtifactStore
    from stages.common import vocabularies
    from stages.feeds import decode_pair, manifest_table
    from zeroseg.models import load_segmenter, read_segmenter_json

    overrides = [*args.e2e_set, f"evaluate.device={args.device}"]
    with tempfile.TemporaryDirectory(prefix="zeroseg-bench-fps-") as work:
        cmd = [sys.executable, "pipeline/run.py", "--config", args.e2e_config, "--work-dir", work]
        for o in overrides:
            cmd += ["--set", o]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"the pipeline run failed (rc {proc.returncode})")

        cfg = load_config(REPO / args.e2e_config, overrides)
        cfg.run.work_dir = work
        store = ArtifactStore(cfg.run.store_uri(), Path(work) / "cache", cfg.run.verify)
        cat = load_catalogue()
        p = plan(cfg, cat.stages, store=store, code_packages=cat.code_packages)
        if any(n.action != "cached" for n in p):
            raise SystemExit("the pipeline run left stages to run; cannot find its artifacts")
        art = {n.name: store.get(n.name, n.key) for n in p}
        splits = art["build_splits"]
        splits.runtime.update(p.nodes["build_splits"].stage.runtime_outputs(p.nodes["build_splits"].config))
        fps = json.loads(art["evaluate"].file("fps.json").read_text())
        ecfg = p.nodes["evaluate"].config
        if getattr(ecfg, "protocol", "resize") != "resize":
            raise SystemExit(
                f"(b) compares with a bare forward at one fixed size: use a config whose evaluate.protocol is "
                f"resize (got {ecfg.protocol!r}; --e2e-set evaluate.protocol=resize)"
            )
        vocabs = vocabularies(splits)
        sets = list(ecfg.sets or [n for n in vocabs if n != "train"])

        seg = load_segmenter(art["train_classifier"].path, device=args.device)
        method = read_segmenter_json(art["train_classifier"].path)["method"]
        size = tuple(fps["protocol"].get("resolution") or seg.input_size)
        mean = torch.tensor(seg.mean).view(1, 3, 1, 1)
        std = torch.tensor(seg.std).view(1, 3, 1, 1)
        per_set: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}
        n_img = 0
        for s in sets:
            t = manifest_table(splits, s)
            if ecfg.max_images is not None:
                t = t.slice(0, ecfg.max_images)
            xs = []
            for img_uri, lbl_uri in zip(t.column("image_uri").to_pylist(), t.column("label_uri").to_pylist()):
                image, _ = decode_pair(img_uri, lbl_uri)
                x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
                xs.append((x - mean) / std)
            x = torch.cat(xs).to(args.device)
            n_img += len(x)
            if getattr(seg, "encodes_text", False):  # DeOP's learnable prompts: once per set, as evaluate
                with torch.inference_mode():
                    text = seg.encode_text(list(vocabs[s].prompt_names)).float().to(args.device)
            else:
                emb = np.load(art["embed_text"].file(f"embeddings/{s}.npy"))
                text = torch.from_numpy(np.asarray(emb, dtype=np.float32)).to(args.device)
            per_set[s] = ([x[i : i + ecfg.batch_size] for i in range(0, len(x), ecfg.batch_size)], text)

    dev = torch.device(args.device)

    def one_pass() -> float:
        with torch.inference_mode():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for batches, text in per_set.values():
                for b in batches:
                    seg(b, text)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return time.perf_counter() - t0

    # evaluate's CPU actor holds 1 CPU, so Ray sets OMP_NUM_THREADS=1 there (ray._private.utils.
    # set_omp_num_threads_if_unset) and torch computes on one thread: the like-for-like bare
    # forward runs on one thread too; the process default is the second measurement
    threads = torch.get_num_threads()
    bare: dict[int, float] = {}
    for n in dict.fromkeys([1, threads]) if dev.type == "cpu" else [threads]:
        torch.set_num_threads(n)
        one_pass()  # warm-up
        bare[n] = n_img / statistics.median(one_pass() for _ in range(args.repeats))
    torch.set_num_threads(threads)
    ref = bare[1] if dev.type == "cpu" else bare[threads]
    ov, e2e = fps["overall"], fps["end_to_end"]
    ms = {
        "forward (bare, like for like)": 1000 / ref,
        "evaluate timed (H2D, resize, normalise, forward, upsample, argmax, count)": (
            1000 * ov["seconds_timed"] / ov["images_timed"] if ov.get("images_timed") else None
        ),
        "evaluate decoding (image + label PNG)": 1000 * ov["decode_seconds"] / max(ov["images"], 1),
        "evaluate end to end": 1000 * e2e["seconds"] / max(e2e["images"], 1),
    }
    timed_ms, dec_ms, e2e_ms = (ms[k] for k in list(ms)[1:])
    breakdown = {
        "forward": ms["forward (bare, like for like)"],
        "resize, normalise, upsample to label size, argmax, count (timed - forward)": (
            timed_ms - ms["forward (bare, like for like)"] if timed_ms is not None else None
        ),
        "decoding": dec_ms,
        "the rest: manifest read, actor start-up, model load, scheduling (end to end - timed - decoding)": (
            e2e_ms - timed_ms - dec_ms if timed_ms is not None else None
        ),
    }
    return {
        "config": args.e2e_config,
        "overrides": overrides,
        "method": method,
        "segmenter": type(seg).__name__,
        "sets": sets,
        "images": n_img,
        "resolution": list(size),
        "batch_size": ecfg.batch_size,
        "pipeline_wall_s": wall,
        "bare_forward_images_per_s": {str(k): v for k, v in bare.items()},
        "bare_reference_threads": 1 if dev.type == "cpu" else threads,
        "evaluate_timed_images_per_s": ov.get("images_per_s"),
        "evaluate_end_to_end_images_per_s": e2e.get("images_per_s"),
        "timed_over_bare": ov["images_per_s"] / ref if ov.get("images_per_s") else None,
        "end_to_end_over_bare": e2e["images_per_s"] / ref if e2e.get("images_per_s") else None,
        "ms_per_image": ms,
        "breakdown_ms_per_image": breakdown,
        "fps_json": fps,
    }


# -- main ------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip", default=TINY_MODEL, help="CLIP architecture (random weights), e.g. ViT-B-16")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--size", type=int, default=None, help="square input size (default: 224 tiny CLIP, 512 else)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--batches", type=int, default=None, help="timed batches per pass (default 8 CPU, 20 GPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches per model first")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed passes per model (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--skip-models", action="store_true", help="only (b)")
    ap.add_argument("--skip-e2e", action="store_true", help="only (a)")
    ap.add_argument("--e2e-config", default="configs/sample.yaml")
    ap.add_argument("--e2e-set", action="append", default=[], metavar="KEY=VALUE", help="override for (b)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="RANDOM WEIGHTS")  # said once in the header instead
    logging.getLogger().setLevel(logging.ERROR)  # open_clip: "No pretrained weights loaded"
    args.size = args.size or (224 if args.clip == TINY_MODEL else 512)
    args.batches = args.batches or (20 if args.device.startswith("cuda") else 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    out: dict[str, Any] = {"benchmark": "fps", "clip": args.clip, "random_weights": True, "size": args.size}
    out["batch_size"], out["device"] = args.batch_size, args.device
    if not args.skip_models:
        res = bench_models(args)
        out["models"] = res
        print(
            f"(a) bare forward, {res['images']} coco128 images at {args.size}x{args.size}, batch {args.batch_size}, "
            f"CLIP {args.clip} (random weights), {len(COCO_STUFF_171)} classes, {args.device}; median of "
            f"{args.repeats} interleaved passes"
        )
        print(
            f"{'model':<15}{'images/s':>10}{'best':>9}{'ms/image':>10}{'x zegformer':>13}{'params M':>10}"
            f"{'peak GPU MiB':>14}"
        )
        for r in res["rows"]:
            if not r["available"]:
                print(f"{r['model']:<15}  {r['why']}")
                continue
            ratio = f"{r['x_vs_zegformer']:.2f}" if r["x_vs_zegformer"] else "-"
            gpu = f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] is not None else "-"
            print(
                f"{r['model']:<15}{r['images_per_s']:>10.2f}{r['best_images_per_s']:>9.2f}{r['ms_per_image']:>10.1f}{ratio:>13}"
                f"{r['params_m']:>10.1f}{gpu:>14}"
            )
    if not args.skip_e2e:
        e = bench_evaluate(args)
        out["evaluate"] = {k: v for k, v in e.items() if k != "fps_json"}
        print(
            f"(b) evaluate vs bare forward: {e['config']} ({e['segmenter']}), sets {e['sets']}, {e['images']} images "
            f"at {e['resolution'][0]}x{e['resolution'][1]}, batch {e['batch_size']}, {args.device}"
        )
        ref = e["bare_reference_threads"]
        w = 76
        print(f"{'measurement':<{w}}{'ms/image':>10}{'images/s':>10}{'x bare':>8}")
        for k, v in e["bare_forward_images_per_s"].items():
            label = f"bare forward, {k} thread(s)" + (" (as evaluate's actor: the reference)" if int(k) == ref else "")
            print(f"{label:<{w}}{1000 / v:>10.1f}{v:>10.2f}{v / e['bare_forward_images_per_s'][str(ref)]:>8.2f}")
        for label, v in list(e["ms_per_image"].items())[1:]:
            ips = 1000 / v if v else float("nan")
            print(
                f"{label:<{w}}{v if v is not None else float('nan'):>10.1f}{ips:>10.2f}{ips / e['bare_forward_images_per_s'][str(ref)]:>8.3f}"
            )
        print("where evaluate's end-to-end time per image goes (ms):")
        for label, v in e["breakdown_ms_per_image"].items():
            print(f"  {label:<{w - 2}}{v if v is not None else float('nan'):>10.1f}")
        print(f"pipeline wall time (all stages, Ray start-up included): {e['pipeline_wall_s']:.1f} s")
    out["machine"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

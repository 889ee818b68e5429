"""Render ablation results: the terminal table, report.md, the speed/error plot, and side-by-side comparisons.

Everything here reads the stored results.json, so `qvl report DIR` renders a past run exactly as the run did.
A train run (results.json `run.mode` = "train") has its own columns, figure notes and plot (loss curves).
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import ResultsError
from ..files import read_json, replacing, reworded

FORMAT = "qvl-ablation/1"  # results.json's "format"; another value is another schema

FIGURES_TEXT = """\
- **vision ms**: the vision tower alone (`model.vision_features` on every image and video of the batch).
- **prefill ms**: time to first token: `prepare` (vision tower, embeddings, 3-D positions) + `prefill` of the
  whole prompt into a fresh KV cache + argmax of the last position. Includes the vision tower.
- **decode tok/s**: batch x (decode tokens - 1) / time of the greedy `decode_step` loop after the prefill (the
  first new token comes out of the prefill). EOS does not stop the loop.
- Timings: median over the repeats after the warm-up runs, with [min-max] (the terminal shows +-half the range
  as a percentage of the median). CUDA events on a GPU, `time.perf_counter` on a CPU.
- **peak MiB**: what the variant itself needs on a GPU: its weights plus the most `torch.cuda.max_memory_allocated`
  rose over its runs (activations, KV cache) above what was resident when it started. Models of other variants
  stay resident during an ablation, so the device-wide peak (results.json: `device_peak_mib`) would count them.
  Not measured on a CPU (results.json keeps the process's max RSS so far, which only grows).
- **rel err / max err**: the variant's logits at every decoded step against the reference's, in float32:
  ||L - L_ref|| / ||L_ref|| (Frobenius over batch x steps x vocab) and max |L - L_ref|. The variant is
  teacher-forced with the reference's greedy tokens, so each step sees the same context. For architecture
  (window size, rope) or dtype variants the weights are the same where shapes agree, so the error is the
  effect of the ablation itself, not noise.
- **agree**: the fraction of the variant's own greedy tokens (free running) equal to the reference's;
  **first div**: the first step where any row differs (0 = the token out of the prefill), "-" if none.
- **fallbacks**: distinct calls the registry routed to the fallback backend because the chosen one could not
  run them (listed below the table)."""

TRAIN_FIGURES_TEXT = """\
- **step ms**: one training step on the batch: the forward with labels (the LM head and the loss included) and
  the backward, gradients of every parameter. Median over the repeats after the warm-up runs, with [min-max]
  (the terminal shows +-half the range as a percentage of the median); no weight is updated while timing. CUDA
  events on a GPU, `time.perf_counter` on a CPU.
- **tokens/s**: tokens in the batch (batch x prompt length, vision placeholders included) / step time.
- **peak MiB**: on a GPU, what the variant's steps need: its weights plus the most `torch.cuda.max_memory_allocated`
  rose over them (activations, gradients) above what was resident when it started. Not measured on a CPU.
- **loss**: the loss of the first step, at the initial weights: mean cross-entropy over the counted tokens (the
  prompt's text tokens; vision placeholders, vision start/end and padding are not counted).
- **final loss**: the last point of the loss curve: the loss before the last of the `train_steps` AdamW steps on
  the same batch, from the same initial weights for every variant (the curve is in results.json and the plot).
- **grad rel err**: the worst parameter's gradient error against the reference's, of one step at the same
  weights: max over parameters of ||g - g_ref|| / ||g_ref|| in float32; **worst param** names that parameter.
  Compared only where the variant's architecture and prompt match the reference's.
- **fallbacks**: distinct calls the registry routed to the fallback backend because the chosen one could not
  run them, e.g. a backward it does not have (listed below the table)."""


# --- reading ------------------------------------------------------------------------------------------------------


MAX_RESULTS_DEPTH = 32  # a results.json nests about 6 deep; the renderers print values, and repr recurses


def load_results(path: str) -> tuple[dict, str]:
    """(results, run folder) from a results.json, a run folder, or a config's folder of runs (the latest run is
    taken), checked by `check_results`. Anything else is a ResultsError naming the file and what is wrong."""
    file = find_results(path)
    return check_results(read_json(file, error=ResultsError), file), os.path.dirname(file)


def find_results(path: str) -> str:
    """The results.json `path` names: itself, its run folder's, or the latest run's in a config's folder.
    (Whether it is a readable file is `read_json`'s to say.)"""
    if not os.path.isdir(path) or os.path.basename(os.path.normpath(path)) == "results.json":
        return path  # a folder named results.json is not searched: read_json says what it is
    own = os.path.join(path, "results.json")
    if os.path.lexists(own):
        return own
    try:
        names = os.listdir(path)
    except OSError as e:
        raise ResultsError(f"{path}: cannot list it: {e.strerror or e}") from None
    runs = sorted(d for d in names if os.path.isfile(os.path.join(path, d, "results.json")))
    if not runs:
        raise ResultsError(f"{path}: no results.json here or in its subfolders")
    return os.path.join(path, runs[-1], "results.json")


# --- checking: what the renderers read ----------------------------------------------------------------------------


def _number(v: Any) -> bool:
    """A JSON number the renderers can format (as a float too: no integer beyond a double's range)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        float(v)
    except OverflowError:
        return False
    return True


# (test, what it allows) for each kind of value the renderers read
TEXT = (lambda v: isinstance(v, str), "a string")
TEXT_OR_NULL = (lambda v: v is None or isinstance(v, str), "a string or null")
OBJECT = (lambda v: isinstance(v, dict), "an object")
OBJECT_OR_NULL = (lambda v: v is None or isinstance(v, dict), "an object or null")
LIST_OR_NULL = (lambda v: v is None or isinstance(v, list), "a list or null")
SHOWN = (lambda v: v is None or isinstance(v, str) or _number(v), "a number, a string or null")  # "nan" as stored
COUNT = (lambda v: v is None or isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)),
         "an integer, a string or null")
TIMING = (lambda v: v is None or (isinstance(v, dict) and all(_number(v.get(k)) for k in ("median", "min", "max"))),
          "null or an object of numbers median, min and max")
CURVE = (lambda v: v is None or (isinstance(v, list) and all(SHOWN[0](x) for x in v)),
         "null or a list of numbers (or strings)")
GRIDS = (lambda v: v is None or (isinstance(v, list) and all(isinstance(g, list) for g in v)),
         "null or a list of [t, h, w] lists")
TEXTS = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings")
ANY = (lambda v: True, "")
TIMING_KEYS = ("vision_ms", "prefill_ms", "decode_tok_s", "step_ms", "tokens_per_s")
ERROR_VALUE_KEYS = ("logits_rel_err", "logits_max_err", "grad_rel_err", "token_agreement")


def check_results(results: Any, file: str) -> dict:
    """`results` (a loaded results.json) checked against everything the renderers read: the tables, report.md,
    the plot and comparisons. Checked once, here, so the renderers can trust what passes; a ResultsError names
    the file, the field and what it must be."""
    if not isinstance(results, dict):
        raise ResultsError(f"{file}: not a qvl ablation results file: the top level is {_show(results)}, "
                           "not an object")
    if "variants" not in results:
        raise ResultsError(f'{file}: not a qvl ablation results file: no "variants"')
    if results.get("format", FORMAT) != FORMAT:
        raise ResultsError(f"{file}: format {_show(results['format'])}: another schema than this qvl's {FORMAT}")
    if _deeper_than(results, MAX_RESULTS_DEPTH):
        raise ResultsError(f"{file}: values nested more than {MAX_RESULTS_DEPTH} deep: not a results.json")

    def check(table: dict, where: str, key: str, kind: tuple, required: bool = False) -> Any:
        if key not in table:
            if required:
                raise ResultsError(f"{file}: {where}{key}: missing")
            return None
        return checked(f"{where}{key}", table[key], kind)

    def checked(where: str, value: Any, kind: tuple) -> Any:
        test, allowed = kind
        if not test(value):
            raise ResultsError(f"{file}: {where}: must be {allowed}, got {_show(value)}")
        return value

    for key in ("name", "status", "reference"):
        check(results, "", key, TEXT, required=True)
    for key in ("description", "error"):
        check(results, "", key, TEXT_OR_NULL)
    env, run, config, work = (check(results, "", k, OBJECT_OR_NULL) or {}
                              for k in ("environment", "run", "config", "workload"))
    check(env, "environment.", "git", OBJECT_OR_NULL)
    check(run, "run.", "device", TEXT)
    check(run, "run.", "tp", (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                              "an integer >= 1 or null"))
    check(check(config, "config.", "model", OBJECT_OR_NULL) or {}, "config.model.", "overrides", OBJECT_OR_NULL)
    if work:
        for key in ("image_grids_thw", "video_grids_thw"):
            check(work, "workload.", key, GRIDS)
        for key in ("batch_size", "prompt_length", "text_tokens", "vision_tokens") + (
                () if is_train(results) else ("decode_tokens",)):
            check(work, "workload.", key, ANY, required=True)
    variants = check(results, "", "variants", (lambda v: isinstance(v, list), "a list of variants"))
    for i, e in enumerate(variants):
        at = f"variants[{i}]."
        checked(at[:-1], e, OBJECT)
        check(e, at, "name", TEXT, required=True)
        check(e, at, "status", TEXT, required=True)
        check(e, at, "error", TEXT_OR_NULL)
        for key in ("plan", "model"):
            check(e, at, key, OBJECT_OR_NULL)
        check(check(e, at, "requested", OBJECT_OR_NULL) or {}, at + "requested.", "overrides", OBJECT_OR_NULL)
        figures = check(e, at, "figures", OBJECT_OR_NULL) or {}
        for key in TIMING_KEYS:
            check(figures, at + "figures.", key, TIMING)
        for key in ("loss", "peak_memory_mib"):
            check(figures, at + "figures.", key, SHOWN)
        check(figures, at + "figures.", "launches_per_decode_step", COUNT)
        check(figures, at + "figures.", "loss_curve", CURVE)
        comparison = check(e, at, "comparison", OBJECT_OR_NULL) or {}
        for key in ERROR_VALUE_KEYS:
            check(comparison, at + "comparison.", key, SHOWN)
        check(comparison, at + "comparison.", "grad_rel_err_param", TEXT_OR_NULL)
        for j, f in enumerate(check(e, at, "fallbacks", LIST_OR_NULL) or []):
            fat = f"{at}fallbacks[{j}]."
            checked(fat[:-1], f, OBJECT)
            for key in ("operator", "requested", "used", "call"):
                check(f, fat, key, ANY, required=True)
            check(f, fat, "reasons", TEXTS, required=True)
    return results


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether lists and objects nest more than `limit` deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def _show(v: Any, limit: int = 60) -> str:
    """A JSON value for a one-line message: objects and lists by kind and size, scalars as written, cut."""
    if isinstance(v, dict):
        return f"an object of {len(v)} keys"
    if isinstance(v, list):
        return f"a list of {len(v)}"
    text = json.dumps(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- numbers ------------------------------------------------------------------------------------------------------


def _median(stat) -> float | None:
    return stat["median"] if isinstance(stat, dict) else None


def _num(x: Any, fmt: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):  # "nan", "inf" as stored
        return x
    return format(x, fmt)


def _timing(stat, fmt: str, style: str) -> str:
    if not isinstance(stat, dict):
        return "-"
    med = stat["median"]
    if style == "md":
        return f"{med:{fmt}} [{stat['min']:{fmt}}-{stat['max']:{fmt}}]"
    spread = (stat["max"] - stat["min"]) / 2 / med * 100 if med else 0.0
    return f"{med:{fmt}} ±{spread:.0f}%"


def _err(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return "0" if x == 0 else f"{x:.2e}"


def is_train(results: dict) -> bool:
    return (results.get("run") or {}).get("mode") == "train"


def _last(values) -> Any:
    return values[-1] if isinstance(values, list) and values else None


def variant_cells(e: dict, style: str = "text") -> dict[str, str]:
    f, c = e.get("figures") or {}, e.get("comparison") or {}
    name = e["name"] + (" (ref)" if e.get("reference") else "")
    agree = c.get("token_agreement")
    return {
        "step ms": _timing(f.get("step_ms"), ".1f", style),
        "tokens/s": _timing(f.get("tokens_per_s"), ".1f", style),
        "loss": _num(f.get("loss"), ".4f"),
        "final loss": _num(_last(f.get("loss_curve")), ".4f"),
        "grad rel err": _err(c.get("grad_rel_err")),
        "worst param": c.get("grad_rel_err_param") or "-",
        "variant": name,
        "status": e["status"],
        "vision ms": _timing(f.get("vision_ms"), ".1f", style),
        "prefill ms": _timing(f.get("prefill_ms"), ".1f", style),
        "decode tok/s": _timing(f.get("decode_tok_s"), ".1f", style),
        "launches/step": _num(f.get("launches_per_decode_step"), "d"),
        "peak MiB": _num(f.get("peak_memory_mib"), ".0f"),
        "rel err": _err(c.get("logits_rel_err")),
        "max err": _err(c.get("logits_max_err")),
        "agree": "-" if agree is None else (agree if isinstance(agree, str) else f"{agree:.0%}"),
        "first div": "-" if c.get("first_divergence") is None else str(c["first_divergence"]),
        "fallbacks": str(len(e.get("fallbacks") or [])),
    }


COLUMNS = ["variant", "status", "vision ms", "prefill ms", "decode tok/s", "launches/step", "peak MiB", "rel err",
           "max err", "agree", "first div", "fallbacks"]
TRAIN_COLUMNS = ["variant", "status", "step ms", "tokens/s", "peak MiB", "loss", "final loss", "grad rel err",
                 "worst param", "fallbacks"]


def columns(results: dict) -> list[str]:
    """The table's columns for the run's mode."""
    return TRAIN_COLUMNS if is_train(results) else COLUMNS


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def format_table(results: dict) -> str:
    """The terminal table, failures and fallbacks under it."""
    cols = columns(results)
    rows = []
    for e in results["variants"]:
        cells = variant_cells(e)
        rows.append([cells[c] for c in cols])
    out = [_grid(cols, rows)]
    failed = [f"  {e['name']}: {e['error'].splitlines()[0] if e['error'] else ''}" for e in results["variants"]
              if e["status"] in ("failed", "interrupted") and e.get("error")]
    if failed:
        out.append("failed:\n" + "\n".join(failed))
    notes = [f"  {e['name']}: {e['comparison']['note']}" for e in results["variants"]
             if (e.get("comparison") or {}).get("compared_to") is None and (e.get("comparison") or {}).get("note")]
    if notes:
        out.append("not compared:\n" + "\n".join(notes))
    fb = [f"  {e['name']}: {f['operator']} {f['requested']} -> {f['used']} ({f['call']}): {'; '.join(f['reasons'])}"
          for e in results["variants"] for f in e.get("fallbacks") or []]
    if fb:
        out.append("fallbacks:\n" + "\n".join(fb))
    return "\n".join(out)


# --- report.md ----------------------------------------------------------------------------------------------------


def render_markdown(results: dict, plot_file: str | None = None, plot_note: str | None = None) -> str:
    env, run, cfg = results.get("environment") or {}, results.get("run") or {}, results.get("config") or {}
    train = is_train(results)
    model, work = cfg.get("model") or {}, results.get("workload") or {}
    git = env.get("git") or {}
    lines = [f"# Ablation: {results['name']}", ""]
    if results.get("description"):
        lines += [results["description"], ""]
    src = f"preset `{model.get('preset')}`" if model.get("preset") else f"checkpoint `{model.get('checkpoint')}`"
    overrides = model.get("overrides") or {}
    lines += [
        f"- status: **{results['status']}**" + (f": {_code(results['error'])}" if results.get("error") else "")
        + f" (started {results.get('started')}, finished {results.get('finished') or '-'})",
        f"- config: `{results.get('config_path') or 'built in'}`; reference variant: `{results['reference']}`",
        f"- model: {src}, {model.get('dtype')}, device {run.get('device')}"
        + (f", overrides {_inline(overrides)}" if overrides else "")
        + (f"; tensor-parallel over {run['tp']} ranks (peak memory, model MiB and launches/step are rank 0's)"
           if run.get("tp") and run["tp"] > 1 else ""),
        f"- runs: {run.get('warmup')} warm-up, {run.get('repeats')} timed repeats; timer: {env.get('timer')}; "
        f"peak memory: {env.get('peak_memory')}",
    ]
    if work:
        vis = []
        if work.get("image_grids_thw"):
            vis.append("images (t, h, w patches) " + ", ".join(str(tuple(g)) for g in work["image_grids_thw"]))
        if work.get("video_grids_thw"):
            vis.append("videos " + ", ".join(str(tuple(g)) for g in work["video_grids_thw"]))
        what = (f"training on the prompt's own tokens, {run.get('train_steps')} AdamW steps at learning rate "
                f"{run.get('learning_rate')} for the loss curve" if train else f"{work['decode_tokens']} new tokens")
        lines.append(f"- workload: batch {work['batch_size']}, prompt {work['prompt_length']} tokens "
                     f"({work['text_tokens']} text, {work['vision_tokens']} vision placeholders), "
                     f"{what}" + (f"; {'; '.join(vis)}" if vis else ""))
    lines.append(f"- environment: {env.get('device_name')}; python {env.get('python')}, torch {env.get('torch')}, "
                 f"triton {env.get('triton') or 'not installed'}"
                 + (" (interpreted)" if env.get("triton_interpret") else "")
                 + f", xformers {env.get('xformers') or 'not installed'}, qvl {env.get('qvl')}; "
                 f"git {git.get('commit', 'unknown')}" + (" (uncommitted changes)" if git.get("dirty") else ""))
    lines += ["", "## Results", ""]
    figures = columns(results)[2:]
    header = ["variant", "backends", "dtype", "status"] + figures
    rows = []
    for e in results["variants"]:
        cells = variant_cells(e, "md")
        req = e.get("requested") or {}
        extra = f"; overrides {_inline(req['overrides'])}" if req.get("overrides") else ""
        if train and req.get("gradient_checkpointing"):
            extra += "; gradient checkpointing"
        rows.append([cells["variant"], f"`{e.get('backends')}`{extra}", str(req.get("dtype", "")), cells["status"]]
                    + [cells[c] for c in figures])
    lines.append(_md_table(header, rows))
    lines += ["", "Timings: median [min-max]."]
    failed = [e for e in results["variants"] if e["status"] in ("failed", "interrupted", "pending", "running")]
    if failed:
        lines += ["", "## Not measured", ""]
        for e in failed:
            lines.append(f"- `{e['name']}`: {e['status']}" + (f": {_code(e['error'])}" if e.get("error") else ""))
    notes = [e for e in results["variants"] if (e.get("comparison") or {}).get("compared_to") is None
             and (e.get("comparison") or {}).get("note")]
    if notes:
        lines += ["", "## Not compared", ""] + [f"- `{e['name']}`: {e['comparison']['note']}" for e in notes]
    with_fb = [e for e in results["variants"] if e.get("fallbacks")]
    if with_fb:
        lines += ["", "## Fallbacks", ""]
        for e in with_fb:
            for f in e["fallbacks"]:
                lines.append(f"- `{e['name']}`: {f['operator']} {f['requested']} -> {f['used']} "
                             f"({f['call']}): {'; '.join(f['reasons'])}")
    lines += ["", "## Plans", ""]
    for e in results["variants"]:
        plan = (e.get("plan") or {}).get("text")
        weights = (e.get("model") or {}).get("weights")
        lines.append(f"- `{e['name']}`: {plan or 'not resolved'}" + (f"; weights {weights}" if weights else ""))
    lines += ["", "## Plot", ""]
    lines.append(f"![speed and error per variant]({plot_file})" if plot_file else f"No plot: {plot_note}")
    lines += ["", "## What the figures mean", "", TRAIN_FIGURES_TEXT if train else FIGURES_TEXT, ""]
    return "\n".join(lines)


def _inline(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _code(text: str) -> str:
    first = text.splitlines()[0] if text else ""
    return "`" + first.replace("`", "'") + "`"


# --- the plot -----------------------------------------------------------------------------------------------------


# (title, key, log scale): bars of a timing's median with its min-max, or of an error against the reference
PANELS = [("vision tower ms", "vision_ms", False), ("prefill ms (time to first token)", "prefill_ms", False),
          ("decode tokens/s", "decode_tok_s", False), ("logits rel. error vs reference", "logits_rel_err", True)]
TRAIN_PANELS = [("step ms (forward + backward)", "step_ms", False), ("training tokens/s", "tokens_per_s", False),
                ("gradient rel. error vs reference", "grad_rel_err", True)]
ERROR_KEYS = {"logits_rel_err", "grad_rel_err"}  # read from the comparison, not the figures
CURVE_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ("-", "x"), ("--", "v")]


def plot_results(results: dict, path: str) -> str | None:
    """Speed and error per variant as one PNG; a train run adds every variant's loss curve below the bars.
    Returns None when written, else why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib is not installed ({e}); pip install matplotlib"
    variants = results["variants"]
    train = is_train(results)
    panels = TRAIN_PANELS if train else PANELS
    bars_height, curve_height = 0.9 + 0.45 * len(variants), 3.4 if train else 0.0
    fig = plt.figure(figsize=(4.2 * len(panels), bars_height + curve_height))
    grid = fig.add_gridspec(2 if train else 1, len(panels),
                            height_ratios=[bars_height, curve_height] if train else None)
    axes: list = []
    for i in range(len(panels)):
        axes.append(fig.add_subplot(grid[0, i], sharey=axes[0] if axes else None))
        if i:
            axes[i].tick_params(labelleft=False)
    _bar_panels(axes, panels, variants)
    if train:
        _loss_curves(fig.add_subplot(grid[1, :]), variants)
    env = results.get("environment") or {}
    fig.suptitle(f"{results['name']}: {env.get('device_name', '')}", fontsize=10)
    try:
        fig.tight_layout()
        with replacing(path, binary=True) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return None


def _bar_panels(axes: list, panels: list, variants: list[dict]) -> None:
    """One horizontal bar per variant in each panel; the variants' names on the first panel's axis."""
    names = [e["name"] + (" (ref)" if e.get("reference") else "") for e in variants]
    ys = list(range(len(variants)))
    for ax, (title, key, log) in zip(axes, panels, strict=True):
        for y, e in zip(ys, variants, strict=True):
            if e["status"] != "ok":
                ax.text(0.02, y, e["status"], va="center", ha="left", color="tab:red",
                        transform=ax.get_yaxis_transform())
                continue
            if key in ERROR_KEYS:
                value = (e.get("comparison") or {}).get(key)
                if not isinstance(value, (int, float)) or value <= 0:
                    label = "ref" if e.get("reference") else ("0" if value == 0 else (value or "n/a"))
                    ax.text(0.02, y, str(label), va="center", ha="left", color="gray",
                            transform=ax.get_yaxis_transform())
                    continue
                ax.barh(y, value, color="tab:orange")
            else:
                stat = (e.get("figures") or {}).get(key)
                if not isinstance(stat, dict):
                    ax.text(0.02, y, "n/a", va="center", ha="left", color="gray", transform=ax.get_yaxis_transform())
                    continue
                med = stat["median"]
                ax.barh(y, med, xerr=[[med - stat["min"]], [stat["max"] - med]], color="tab:blue", capsize=3)
        ax.set_title(title, fontsize=10)
        values = [v for v in _panel_values(variants, key) if v > 0]
        if log or (values and max(values) / min(values) > 50):  # e.g. interpreted Triton next to eager
            ax.set_xscale("log")
            # within one decade matplotlib labels the minor ticks too: turned, so they do not overlap
            ax.tick_params(axis="x", which="minor", labelsize=7, labelrotation=45)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(names, fontsize=9)
    axes[0].invert_yaxis()


def _loss_curves(ax, variants: list[dict]) -> None:
    """Every measured variant's loss curve on one axis; line and marker styles differ, since equal curves
    (a checkpointing variant and its reference) lie on top of each other."""
    drawn = 0
    for e in variants:
        curve = (e.get("figures") or {}).get("loss_curve")
        if e["status"] != "ok" or not isinstance(curve, list) or not curve:
            continue
        line, marker = CURVE_STYLES[drawn % len(CURVE_STYLES)]
        values = [float(v) if isinstance(v, (int, float)) else float("nan") for v in curve]  # "nan" as stored
        ax.plot(range(len(values)), values, linestyle=line, marker=marker, markersize=4, alpha=0.8,
                label=e["name"] + (" (ref)" if e.get("reference") else ""))
        drawn += 1
    ax.set_title("loss before each AdamW step (same batch, same initial weights)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no loss curve measured", ha="center", va="center", color="gray", transform=ax.transAxes)


def _panel_values(variants: list[dict], key: str) -> list[float]:
    out = []
    for e in variants:
        if e["status"] != "ok":
            continue
        if key in ERROR_KEYS:
            value = (e.get("comparison") or {}).get(key)
        else:
            value = _median((e.get("figures") or {}).get(key))
        if isinstance(value, (int, float)):
            out.append(float(value))
    return out


def render_run(results: dict, directory: str) -> dict:
    """Write plot.png and report.md into `directory`; returns what happened to the plot."""
    plot_path = os.path.join(directory, "plot.png")
    try:
        skipped = plot_results(results, plot_path)
    except Exception as e:  # a plotting problem must never cost the measurements
        skipped = f"plotting failed: {type(e).__name__}: {e}"
    info = {"file": "plot.png"} if skipped is None else {"skipped": skipped}
    md = render_markdown(results, "plot.png" if skipped is None else None, skipped)
    with replacing(os.path.join(directory, "report.md")) as f:
        f.write(md)
    return info


def write_comparison(runs: list[tuple[dict, str]], out: str) -> str:
    """OUT/compare.md (`compare_runs` as markdown; the folder made if missing); returns its path."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        why = "a file of that name is in the way" if isinstance(e, FileExistsError) else e.strerror or e
        raise reworded(e, f"cannot create the folder {out}: {why}") from None
    path = os.path.join(out, "compare.md")
    with replacing(path) as f:
        f.write(compare_runs(runs, style="md"))
    return path


# --- comparing runs -----------------------------------------------------------------------------------------------


def run_label(results: dict, directory: str) -> str:
    return f"{results['name']}/{os.path.basename(os.path.normpath(directory))}"


def compare_runs(runs: list[tuple[dict, str]], style: str = "text") -> str:
    """Variants of several runs side by side: one row per (variant, run), speed relative to the first run.
    Train runs compare their step time, unless generate runs are among them."""
    train = all(is_train(r) for r, _ in runs)
    figures, speed, ratio_name = ((["step ms", "tokens/s", "loss", "grad rel err"], "step_ms", "step vs first")
                                  if train else
                                  (["vision ms", "prefill ms", "decode tok/s", "launches/step", "rel err", "agree"],
                                   "prefill_ms", "prefill vs first"))
    header = ["variant", "run", "device", "status", *figures, ratio_name]
    names: list[str] = []
    for results, _ in runs:
        for e in results["variants"]:
            if e["name"] not in names:
                names.append(e["name"])
    rows = []
    for name in names:
        base = None
        for results, directory in runs:
            e = next((x for x in results["variants"] if x["name"] == name), None)
            if e is None:
                continue
            cells = variant_cells(e, "md" if style == "md" else "text")
            ms = _median((e.get("figures") or {}).get(speed))
            if base is None and ms:
                base, ratio = ms, "1.00x"
            else:
                ratio = f"{ms / base:.2f}x" if ms and base else "-"
            rows.append([name, run_label(results, directory), (results.get("environment") or {}).get("device_name", "-")
                         if style == "md" else (results.get("run") or {}).get("device", "-"), e["status"],
                         *(cells[c] for c in figures), ratio])
    if style == "md":
        def environment(r: dict) -> dict:
            return r.get("environment") or {}

        intro = ["# Ablation runs compared", ""] + [f"- `{run_label(r, d)}`: {r.get('status')}, "
                                                    f"{environment(r).get('device_name')}, "
                                                    f"git {(environment(r).get('git') or {}).get('commit')}"
                                                    for r, d in runs]
        return "\n".join(intro + ["", _md_table(header, rows), "",
                                  f"{ratio_name}: this run's median {'step' if train else 'prefill'} time over "
                                  "the first listed run's for the same variant.", ""])
    return _grid(header, rows)


__all__ = ["FORMAT", "check_results", "compare_runs", "find_results", "format_table", "load_results", "plot_results",
           "render_markdown", "render_run", "write_comparison"]

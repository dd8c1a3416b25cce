"""The comparison's report: report.md, summary.json and three plots, from the runs' result files.

`write_report` reads nothing itself: it takes each run's result.json (the final measurement) and
history.json (the measurements along the budget) and aggregates over seeds with
`rlhf_lab.compare.stats.mean_ci` (mean ± 95% Student-t interval).
"""

from __future__ import annotations

import json
import os
import shlex
from collections import defaultdict

from rlhf_lab.algorithms import algorithm_names, get_algorithm
from rlhf_lab.compare.config import CompareConfig
from rlhf_lab.compare.stats import MeanCI, mean_ci, student_t_quantile

__all__ = ["METRICS", "aggregate", "write_report", "PLOTS"]

# (result key, table header, digits): the columns of the main table, in order.
METRICS = [
    ("gold_reward", "gold score, sampled", 3),
    ("greedy_gold_reward", "gold score, greedy", 3),
    ("proxy_reward", "proxy reward", 3),
    ("kl", "KL to SFT (nats)", 3),
    ("seconds", "wall time (s)", 0),
    ("generated_tokens", "generated tokens", 0),
    ("samples", "samples", 0),
]
PLOTS = ("reward_vs_budget.png", "gold_vs_proxy.png", "reward_kl_frontier.png")
LEVEL = 0.95


def _color(algorithm: str) -> str:
    return f"C{algorithm_names().index(algorithm) % 10}"


def _gold_unit(task: str) -> str:
    return "fraction correct" if task == "arithmetic" else "mean judge score, 0-1"


PROXY_UNIT = "reward-model score; SFT samples: mean 0, std 1"
PROXY_LABEL = "proxy reward\n(reward-model score; SFT samples: mean 0, std 1)"
KL_LABEL = "KL to the SFT policy (nats per response)"


def _budget_label(unit: str) -> str:
    return "budget: responses sampled (samples)" if unit == "samples" else "budget: response tokens generated (tokens)"


def aggregate(results: list[dict], algorithms: list[str], keys: list[str] | None = None) -> dict[str, dict[str, MeanCI]]:
    """Mean ± 95% CI over seeds of each metric, per algorithm; returns {algorithm: {key: MeanCI}}."""
    keys = keys or [k for k, _, _ in METRICS]
    out: dict[str, dict[str, MeanCI]] = {}
    for alg in algorithms:
        rows = [r for r in results if r["algorithm"] == alg]
        if rows:
            out[alg] = {k: mean_ci([r[k] for r in rows], LEVEL) for k in keys}
    return out


def _trajectory(histories: list[list[dict]], key: str, x_key: str | None = None) -> list[tuple[float, MeanCI]]:
    """Per checkpoint index (shared by the seeds): the mean x and the MeanCI of `key` over seeds."""
    by_index: dict[int, list[dict]] = defaultdict(list)
    for history in histories:
        for row in history:
            by_index[row["checkpoint"]].append(row)
    points = []
    for idx in sorted(by_index):
        rows = by_index[idx]
        x = sum(r[x_key] for r in rows) / len(rows) if x_key else float(idx)
        points.append((x, mean_ci([r[key] for r in rows], LEVEL)))
    return points


# ---------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9})
    return plt


def _plot_reward_vs_budget(path: str, config: CompareConfig, histories: dict[str, list[list[dict]]],
                           n_seeds: int) -> None:
    plt = _plt()
    x_key = "samples" if config.budget_unit == "samples" else "generated_tokens"
    panels = [("gold_reward", f"gold score, sampled\n({_gold_unit(config.task)})"),
              ("greedy_gold_reward", f"gold score, greedy\n({_gold_unit(config.task)})"),
              ("proxy_reward", PROXY_LABEL)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for alg, hs in histories.items():
            color = _color(alg)
            if not get_algorithm(alg).online:
                # Offline: every sample is drawn before training, so there is only a start (the SFT
                # policy, at 0) and an end (after training, at the budget spent).
                start = _trajectory([h[:1] for h in hs], key)[0][1]
                x_end = sum(h[-1][x_key] for h in hs) / len(hs)
                end = mean_ci([h[-1][key] for h in hs], LEVEL)
                ax.plot([0, x_end], [start.mean, end.mean], ls=":", color=color)
                err = None if end.half_width is None else [[end.half_width], [end.half_width]]
                ax.errorbar([x_end], [end.mean], yerr=err, fmt="s", color=color, capsize=4, ms=7,
                            label=f"{alg} (offline: all samples drawn before training)")
                continue
            points = _trajectory(hs, key, x_key)
            xs = [x for x, _ in points]
            ax.plot(xs, [m.mean for _, m in points], "o-", color=color, ms=4, label=alg)
            if all(m.half_width is not None for _, m in points):
                ax.fill_between(xs, [m.low for _, m in points], [m.high for _, m in points], color=color, alpha=0.18)
        ax.set_xlabel(_budget_label(config.budget_unit))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    axes[0].legend(loc="best")
    band = f"bands: 95% CI over {n_seeds} seeds" if n_seeds > 1 else "1 seed: no CI"
    fig.suptitle(f"{config.task} task: reward vs budget (lines: mean over seeds; {band}; "
                 f"measured on the eval prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_pairs(ax, histories: dict[str, list[list[dict]]], x_key: str, y_key: str) -> None:
    """Mean trajectory per algorithm (start ○ → end ■, with 95% CIs on both axes at the end)."""
    for alg, hs in histories.items():
        color = _color(alg)
        xs = _trajectory(hs, x_key)
        ys = _trajectory(hs, y_key)
        ax.plot([m.mean for _, m in xs], [m.mean for _, m in ys], ".-", color=color, alpha=0.8, lw=1.5, ms=5)
        ax.plot([xs[0][1].mean], [ys[0][1].mean], "o", color=color, mfc="white", ms=7)
        end_x = mean_ci([h[-1][x_key] for h in hs], LEVEL)
        end_y = mean_ci([h[-1][y_key] for h in hs], LEVEL)
        ax.errorbar([end_x.mean], [end_y.mean], xerr=end_x.half_width, yerr=end_y.half_width, fmt="s",
                    color=color, capsize=4, ms=7, label=alg)
        ax.plot([h[-1][x_key] for h in hs], [h[-1][y_key] for h in hs], "x", color=color, alpha=0.6, ms=6)
    ax.grid(alpha=0.3)


def _plot_gold_vs_proxy(path: str, config: CompareConfig, histories: dict[str, list[list[dict]]]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 6))
    _plot_pairs(ax, histories, "proxy_reward", "gold_reward")
    ax.set_xlabel(PROXY_LABEL.replace("\n", " "))
    ax.set_ylabel(f"gold score, sampled ({_gold_unit(config.task)})")
    ax.set_title(f"{config.task}: gold score vs proxy reward (over-optimisation), on the same sampled responses\n"
                 "○ start (SFT) → • measurements along the budget → ■ end: mean over seeds with 95% CI; "
                 "× single seeds", fontsize=9)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_frontier(path: str, config: CompareConfig, histories: dict[str, list[list[dict]]]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (key, label) in zip(axes, [("gold_reward", f"gold score, sampled\n({_gold_unit(config.task)})"),
                                       ("proxy_reward", PROXY_LABEL)], strict=True):
        _plot_pairs(ax, histories, "kl", key)
        ax.set_xlabel(KL_LABEL)
        ax.set_ylabel(label)
        ax.set_xlim(left=min(0.0, ax.get_xlim()[0]))
    axes[0].legend(loc="best")
    fig.suptitle(f"{config.task}: reward vs KL to the SFT policy (the frontier: up and to the left is better)\n"
                 "each line: one algorithm's mean over seeds along its budget; ○ start (SFT) → ■ end "
                 "with 95% CI; × single seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------- report.md
def _cell(m: MeanCI, digits: int) -> str:
    if m.half_width is None:  # one seed: the heading says there is no interval
        return f"{m.mean:.{digits}f}"
    return f"{m.mean:.{digits}f} ± {m.half_width:.{digits}f}"


def _settings(config: CompareConfig) -> list[str]:
    """One line per algorithm: the settings it ran with (the demo's)."""
    demo = config.demo_config()
    lines = []
    for alg in config.algorithms:
        entry, c = get_algorithm(alg), demo.final_config(alg)
        if entry.stage == "dpo":
            lines.append(f"- `{alg}`: pairs from the budget's SFT samples ranked by the proxy (at most "
                         f"{config.dpo_max_pairs_per_prompt} per prompt), then {demo.budget(alg)} optimiser "
                         f"steps of {c.variant} DPO, β = {c.beta}, NLL coefficient {c.nll_coef} (RPO), "
                         f"lr {c.lr:g}, batch {c.batch_size} "
                         + ("rows (KTO splits each pair into two)" if c.variant == "kto" else "pairs"))
        elif entry.stage == "online_dpo":
            lines.append(f"- `{alg}`: {c.batch_size} prompts × 2 responses per iteration ranked by the proxy, "
                         f"{c.variant} DPO, β = {c.beta}, lr {c.lr:g}")
        else:
            kl = f"KL ({c.kl_estimator}) in the {c.kl_in}, β = {c.kl_coef}"
            if c.surrogate == "cispo":
                clip = f"CISPO weight clipped at 1 + {c.clip_ratio_high}"
            elif c.clip_ratio is None:
                clip = "no clipping"
            else:
                high = "" if c.clip_ratio_high is None else f", ε_high = {c.clip_ratio_high}"
                clip = f"clip ε = {c.clip_ratio}{high}" + ("" if c.dual_clip is None else f", dual clip {c.dual_clip}")
            critic = f", critic lr {c.critic_lr:g}, vf_coef {c.vf_coef}" if c.baseline == "critic" else ""
            update = (f"{c.ppo_epochs} epoch(s) × {c.minibatches} minibatch(es)" if c.update == "gradient"
                      else f"one TRPO step (max_kl {c.max_kl}, {c.cg_iters} CG iterations)")
            lines.append(f"- `{alg}`: {c.prompts_per_step} prompts × {c.samples_per_prompt} responses "
                         f"= {c.prompts_per_step * c.samples_per_prompt} samples per iteration; baseline "
                         f"`{c.baseline}`; {update}; {clip}; {kl}; lr {c.lr:g}{critic}")
    return lines


def _command(config: CompareConfig, out: str) -> str:
    parts = ["rlhf-lab", "compare", "--task", config.task, "--algorithms", ",".join(config.algorithms),
             "--seeds", str(config.seeds), "--budget", str(config.budget), "--budget-unit", config.budget_unit,
             "--evals", str(config.evals)]
    if config.base_seed:
        parts += ["--base-seed", str(config.base_seed)]
    if config.backbone != "gpt2-tiny":
        parts += ["--backbone", config.backbone]
    if config.quick:
        parts.append("--quick")
    return " ".join(shlex.quote(p) for p in [*parts, "--out", out])


def write_report(out: str, config: CompareConfig, results: list[dict], histories: dict[str, list[dict]],
                 base: dict, meta: dict | None = None) -> str:
    """Write report.md, summary.json and the three plots (`PLOTS`) into `out`; returns report.md's path.

    `results`: each run's result.json; `histories`: run name → its history.json rows; `base`: the
    base's marker (base.json); `meta`: `workers`, `executed`, `seconds` of this call (optional).
    """
    meta = meta or {}
    algorithms = [a for a in config.algorithms if any(r["algorithm"] == a for r in results)]
    table = aggregate(results, algorithms)
    by_alg = {a: [histories[r["run"]] for r in results if r["algorithm"] == a] for a in algorithms}
    n_seeds = config.seeds
    _plot_reward_vs_budget(os.path.join(out, PLOTS[0]), config, by_alg, n_seeds)
    _plot_gold_vs_proxy(os.path.join(out, PLOTS[1]), config, by_alg)
    _plot_frontier(os.path.join(out, PLOTS[2]), config, by_alg)

    unit = config.budget_unit
    starts = [h[0] for hs in by_alg.values() for h in hs if h and h[0]["checkpoint"] == 0]
    gold_unit = _gold_unit(config.task)
    s = base["summary"]
    ci_words = (f"mean ± half-width of the 95% confidence interval over the {n_seeds} seeds" if n_seeds > 1
                else "one seed, so no confidence interval")
    lines = [
        f"# {config.task}: {', '.join(algorithms)} at an equal budget of {config.budget:,} {unit}",
        "",
        f"Every run starts from one SFT checkpoint and one reward model (the shared base in `base/`, "
        f"seed {config.base_seed}), trains against that reward model (the *proxy*) until it has spent "
        f"{config.budget:,} {unit}, and is measured on the task's {len(_eval_prompts(config))} eval prompts. "
        f"The task's gold judge only measures. {len(config.algorithms)} algorithms × {n_seeds} seeds "
        f"(0 … {n_seeds - 1}).",
        "",
        f"## Results ({ci_words})",
        "",
        "| algorithm | seeds | " + " | ".join(h for _, h, _ in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    if starts:  # the SFT policy, measured at the start of every run (the same numbers each time)
        cells = []
        for key, _, digits in METRICS:
            if key in ("samples", "generated_tokens"):
                cells.append("0")
            elif key == "seconds":
                cells.append("–")
            else:
                # round(...) + 0.0 turns a -0.000 (a KL of -1e-9) into 0.000
                cells.append(f"{round(sum(r[key] for r in starts) / len(starts), digits) + 0.0:.{digits}f}")
        lines.append("| SFT (start) | – | " + " | ".join(cells) + " |")
    for alg in algorithms:
        n = table[alg][METRICS[0][0]].n
        lines.append(f"| {alg} | {n} | " + " | ".join(_cell(table[alg][k], d) for k, _, d in METRICS) + " |")
    lines += [
        "",
        f"Gold score: the gold judge's mean score ({gold_unit}); *sampled* on {config.eval_samples_per_prompt} "
        "responses per eval prompt at temperature 1, *greedy* on the greedy response. Proxy reward: the "
        f"reward model's score of the same sampled responses ({PROXY_UNIT}). KL: k1 on the sampled tokens, "
        "summed per response, mean over responses (nats per response), to the SFT policy. Wall time: "
        "seconds of training (DPO: its sampling too), the measurements excluded. Generated tokens and "
        "samples: what the run sampled in all (its budget counters at the end).",
        "",
        "## Plots",
        "",
        f"1. `{PLOTS[0]}`: gold score (sampled, greedy) and proxy reward against the budget; lines are "
        "means over seeds, bands 95% CIs.",
        f"2. `{PLOTS[1]}`: gold score against proxy reward along each algorithm's budget (over-optimisation: "
        "the proxy rises while the gold score stalls or falls).",
        f"3. `{PLOTS[2]}`: gold score and proxy reward against KL to the SFT policy (the reward-KL frontier).",
        "",
        f"![reward vs budget]({PLOTS[0]})",
        "",
        f"![gold vs proxy]({PLOTS[1]})",
        "",
        f"![reward vs KL]({PLOTS[2]})",
        "",
        "## Method",
        "",
        "**Budget.** " + _budget_text(config),
        "",
        "**Measurements.** Each run is measured at the start (the SFT policy), each time its budget "
        f"counter passes k/{config.evals} of the budget (k = 1 … {config.evals}; at the first iteration at "
        "or past it), and at the end. A measurement samples "
        f"{config.eval_samples_per_prompt} responses per eval prompt at temperature 1 with a generator "
        f"seeded {config.eval_seed} (the same random numbers in every run and at every point), scores them "
        "with the proxy and the gold judge, computes their KL to the SFT policy, and adds the gold score "
        "of the greedy responses. The table holds each run's last measurement.",
        "",
        "**Confidence intervals.** For n seeds with values x₁ … xₙ: mean x̄ ± t(0.975, n − 1) · s / √n, "
        "with s² = Σ(xᵢ − x̄)² / (n − 1) and t(0.975, n − 1) the Student t quantile"
        + (f" ({student_t_quantile(0.975, n_seeds - 1):.3f} for these {n_seeds} seeds)" if n_seeds > 1 else "")
        + ". It treats the seeds' results as independent draws from a normal distribution; with few seeds "
        "the intervals "
"are wide by design. One seed gets no interval. The interval covers seed-to-seed variation only: "
        "the base (SFT checkpoint and reward model) is the same for every run.",
        "",
        f"**Seeds.** Seed s (0 … {n_seeds - 1}) seeds everything of a run: the prompt order, sampling, "
        "minibatch shuffles, DPO's pair draws. The base has its own seed "
        f"({config.base_seed}): pretraining, SFT, the reward model and the prompt split are shared.",
        "",
        "**Settings** (the demo's, `rlhf_lab.demo.DemoConfig`):",
        "",
        *_settings(config),
        "",
        "## Base",
        "",
        f"- SFT greedy gold score: {s['sft']['gold_accuracy']:.3f} ({gold_unit}) on the eval prompts",
        f"- reward model: {s['reward_model']['pairs']} gold-ranked preference pairs of SFT samples, "
        f"held-out pair accuracy {s['reward_model']['val_accuracy']:.3f}",
        f"- proxy normalisation: score = (raw − {base['reward_shift']:.4f}) / {base['reward_scale']:.4f} "
        "(mean 0, std 1 on one SFT sample per RL prompt)",
        f"- built in {base['seconds']:.0f} s",
        "",
        "## Runs",
        "",
        "| run | " + " | ".join(h for _, h, _ in METRICS) + " | optimiser steps |",
        "|---|" + "---|" * (len(METRICS) + 1),
    ]
    for r in results:
        lines.append(f"| {r['run']} | " + " | ".join(f"{r[k]:.{d}f}" for k, _, d in METRICS)
                     + f" | {r['optimizer_steps']} |")
    workers = meta.get("workers", 1)
    lines += [
        "",
        f"Wall times are per run on this machine ({results[0].get('threads', '?')} torch thread(s) per run"
        + (f"; {workers} runs at a time shared the CPU, so times are inflated" if workers > 1 else "")
        + "). Each run folder holds `result.json` (its row), `history.json` (every measurement), "
        "`policy/` (the final policy) and the Lightning logs.",
        "",
        "## Reproduce",
        "",
        "```",
        _command(config, out),
        "```",
        "",
        "Re-running the same command skips finished runs and the base; adding algorithms or seeds "
        "trains only the new runs.",
        "",
    ]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    summary = {
        "config": {**config.identity(), "algorithms": list(config.algorithms), "seeds": config.seeds},
        "base": base["summary"],
        "level": LEVEL,
        "table": {alg: {k: {"mean": m.mean, "half_width": m.half_width, "n": m.n, "std": m.std,
                            "values": [r[k] for r in results if r["algorithm"] == alg]}
                        for k, m in row.items()} for alg, row in table.items()},
        "runs": results,
        "plots": list(PLOTS),
        **({"seconds": meta["seconds"]} if "seconds" in meta else {}),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return path


def _eval_prompts(config: CompareConfig) -> list[str]:
    from rlhf_lab.tasks import get_task

    return get_task(config.task).eval_prompts()


def _budget_text(config: CompareConfig) -> str:
    counter = ("`budget/samples`: responses sampled" if config.budget_unit == "samples"
               else "`budget/generated_tokens`: response tokens sampled, EOS included")
    demo = config.demo_config()
    shared = demo.final_config("ppo")  # the online algorithms' batches
    text = (f"{config.budget:,} {config.budget_unit} per run, counted by {counter} "
            "(`rlhf_lab.stages.common.Budget`). The online algorithms stop at the first iteration at which "
            "the counter reaches the budget, so a run may overshoot by less than one iteration (the table "
            "shows what each spent).")
    offline = [a for a in config.algorithms if get_algorithm(a).stage == "dpo"]  # dpo and its variants
    if offline:
        text += (f" DPO ({', '.join(offline)}) is offline: before training it samples responses from the SFT "
                 f"policy in the online algorithms' batches ({shared.prompts_per_step} prompts × "
                 f"{shared.samples_per_prompt} responses, temperature 1) until the same counter reaches the "
                 "budget, ranks each prompt's distinct responses with the proxy reward model into "
                 f"chosen/rejected pairs, and trains on them for "
                 + (f"{demo.budget(offline[0])} optimiser steps. " if len({demo.budget(a) for a in offline}) == 1
                    else "the optimiser steps listed below. ") +
                 "Those steps sample nothing, so they are not "
                 "counted; DPO's budget is the samples (or tokens) it drew, and its wall time includes the "
                 "sampling. In the budget plot DPO is a start and an end point, not a curve.")
    if "online_dpo" in config.algorithms:
        text += " Online DPO counts its two responses per prompt per iteration like the others."
    return text

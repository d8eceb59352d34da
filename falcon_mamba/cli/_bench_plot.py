"""PNG plots of a `falcon-mamba bench` result (matplotlib, imported only here)."""

from __future__ import annotations

from pathlib import Path


def _footer(env: dict) -> str:
    commit = (env.get("commit") or "?")[:10] + ("+dirty" if env.get("dirty") else "")
    return (f"{env.get('gpu')} | commit {commit} | torch {env.get('torch')} | "
            f"triton {env.get('triton')} | transformers {env.get('transformers')}")


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def plot_all(res: dict, out_dir: Path) -> list[str]:
    """Write speed.png, memcap.png and generation.png for the sections present; returns the names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = res.get("env", {})
    written = []
    dec, pre = res.get("decode"), res.get("prefill")
    if isinstance(dec, dict) and "rows" in dec or isinstance(pre, dict) and "rows" in pre:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        if isinstance(dec, dict) and "rows" in dec:
            rows = dec["rows"]
            short = {"ours": "ours", "ours (no graphs)": "ours,\nno graph",
                     "transformers FalconMamba": "transformers"}
            labels = [f"{short.get(r['system'], r['system'])}\nB={r['batch']}" for r in rows]
            axes[0].bar(labels, [r["tok_per_s"] for r in rows],
                        color=["C0" if r["system"].startswith("ours") else "C1" for r in rows])
            axes[0].tick_params(axis="x", labelsize=8)
            for i, r in enumerate(rows):
                if r.get("ceiling_tok_per_s"):
                    axes[0].plot([i - 0.4, i + 0.4], [r["ceiling_tok_per_s"]] * 2, "k--", lw=1)
            axes[0].set_yscale("log")
            axes[0].set_ylabel("tokens / s (dashed: bandwidth ceiling)")
            axes[0].set_title("decode")
        if isinstance(pre, dict) and "rows" in pre:
            for system, color in (("ours", "C0"), ("transformers FalconMamba", "C1"),
                                  ("transformer (Mistral-7B shape)", "C2")):
                pts = [r for r in pre["rows"] if r["system"] == system]
                if pts:
                    axes[1].plot([r["length"] for r in pts], [r["tok_per_s"] for r in pts], "o-",
                                 color=color, label=system)
            if pre.get("ceiling_tok_per_s"):
                axes[1].axhline(pre["ceiling_tok_per_s"], color="k", ls="--", lw=1,
                                label="matmul ceiling (ours)")
            axes[1].set_xscale("log", base=2)
            axes[1].set_yscale("log")
            axes[1].set_xlabel("prompt length (tokens)")
            axes[1].set_ylabel("prefill tokens / s")
            axes[1].set_title("prefill (batch 1)")
            axes[1].legend(fontsize=8)
        fig.suptitle("Falcon Mamba 7B shapes, bf16, random weights", fontsize=11)
        fig.text(0.5, -0.02, _footer(env), ha="center", fontsize=8)
        _save(fig, out_dir / "speed.png")
        plt.close(fig)
        written.append("speed.png")
    mc = res.get("memcap")
    if isinstance(mc, dict) and "results" in mc:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = list(mc["results"])
        vals = [mc["results"][n].get("max_tokens", 0) for n in names]
        bars = ax.bar(names, vals, color=["C0" if n.startswith("Falcon") else "C2" for n in names])
        for b, n, v in zip(bars, names, vals):
            lim = mc["results"][n].get("first_failure") is None
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,}" + ("+\n(no limit hit)" if lim else ""),
                    ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("longest prompt that fits (tokens)")
        ax.set_title(f"Prompt length under a {mc['cap_gb']:.0f} GB memory cap (bf16)")
        ax.tick_params(axis="x", labelsize=8)
        fig.text(0.5, -0.04, _footer(env), ha="center", fontsize=7)
        _save(fig, out_dir / "memcap.png")
        plt.close(fig)
        written.append("memcap.png")
    gen = res.get("generation")
    if isinstance(gen, dict) and "ours" in gen:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for key, label, color in (("ours", "Falcon Mamba (ours, CUDA graphs)", "C0"),
                                  ("transformer", "Mistral-7B-shaped transformer (transformers)", "C2")):
            pts = [p for p in gen.get(key) or [] if "tok_per_s" in p]
            if not pts:
                continue
            xs = [p["position"] for p in pts]
            axes[0].plot(xs, [p["tok_per_s"] for p in pts], "o-", color=color, label=label)
            axes[1].plot(xs, [p["peak_gib"] for p in pts], "o-", color=color, label=label)
        axes[0].set_xlabel("tokens generated so far (position)")
        axes[0].set_ylabel("decode tokens / s (batch 1)")
        axes[1].set_xlabel("tokens generated so far (position)")
        axes[1].set_ylabel("peak GPU memory while decoding (GiB)")
        for ax in axes:
            ax.legend(fontsize=8)
            ax.set_ylim(bottom=0)
        fig.suptitle("Decode throughput and memory along a long generation", fontsize=11)
        fig.text(0.5, -0.02, _footer(env), ha="center", fontsize=8)
        _save(fig, out_dir / "generation.png")
        plt.close(fig)
        written.append("generation.png")
    return written

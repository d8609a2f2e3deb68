"""What the detector benchmark shows: its Markdown table and document, and a progress line with an ETA.

Rows are the dicts of ``detector.run_group`` (one per config and attention backend)."""
import os
import sys
import time

__all__ = ["Progress", "hms", "markdown_document", "markdown_table", "profile_lines", "write_atomic"]


def hms(seconds):
    """``1h02m03s`` from one hour on, else ``2m03s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """A tqdm bar on a terminal, else one line per event (at most one per ``min_interval`` seconds,
    and the last); both with an ETA (costs are estimates)."""

    def __init__(self, total, quiet=False, min_interval=0.0):
        self.total, self.done, self.t0, self.quiet = total, 0.0, time.perf_counter(), quiet
        self.min_interval, self.last_line = min_interval, float("-inf")
        self.bar = None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=round(total, 1), file=sys.stderr, dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| {elapsed}<{remaining}")
            except ImportError:
                pass

    def update(self, cost, what):
        """Count ``cost`` as done and show ``what`` was just done."""
        self.done = min(self.total, self.done + cost)
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_description(what[:60])
            self.bar.update(round(cost, 1))
            return
        elapsed = time.perf_counter() - self.t0
        if elapsed - self.last_line < self.min_interval and self.done < self.total:
            return
        self.last_line = elapsed
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        print(f"[{100 * self.done / self.total:5.1f}%] {what}   elapsed {hms(elapsed)}  ETA {hms(eta)}",
              file=sys.stderr, flush=True)

    def close(self):
        """Close the tqdm bar, if any."""
        if self.bar is not None:
            self.bar.close()


def _mem(nbytes):
    """Bytes as GiB (from 1 GiB on) or MiB; "-" when not measured."""
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _gain(row, mode):
    """ENACT's memory saving over the baseline in ``mode``, in percent; "-" for a baseline."""
    g = row.get(f"{mode}_memory_gain")
    return "-" if g is None else f"{100 * g:.1f}%"


def _time(row, key, mode, scale=1.0, digits=4):
    """The time ``row[key]``, followed by its ratio to the baseline's when there is one."""
    if key not in row:
        return "-"
    text = f"{row[key] * scale:.{digits}f}"
    ratio = row.get(f"{mode}_time_ratio")
    return text if ratio is None else f"{text} ({ratio:.2f}x)"


def _clusters(row):
    """Mean clusters per layer, with the mean compression N/M; "-" for a model without ENACT."""
    if "clusters_mean" not in row:
        return "-"
    text = f"{row['clusters_mean']:.1f}"
    if "compression_mean" in row:
        text += f" ({row['compression_mean']:.1f}x)"
    return text


def markdown_table(rows):
    """One table line per row: memory, gain and time of every mode, clusters per layer."""
    lines = [
        "| model | attention | batch | train mem | gain | train s/img | infer mem | gain | infer s/img "
        "| encoder ms/img | encoder mem | gain | clusters/layer (N/M) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['attention']} | {r['batch']} "
            f"| {_mem(r.get('train_memory_bytes'))} | {_gain(r, 'train')} | {_time(r, 'train_s_per_img', 'train')} "
            f"| {_mem(r.get('infer_memory_bytes'))} | {_gain(r, 'infer')} | {_time(r, 'infer_s_per_img', 'infer')} "
            f"| {_time(r, 'encoder_ms_per_img', 'encoder', digits=2)} "
            f"| {_mem(r.get('encoder_memory_bytes'))} | {_gain(r, 'encoder')} | {_clusters(r)} |"
        )
    return "\n".join(lines)


def profile_lines(rows):
    """One line per profiled (variant, mode): labelled ranges and costliest backward functions."""
    lines = []
    for row in rows:
        for mode, prof in row.get("profile", {}).items():
            step = prof["step_ms"] or 1.0
            parts = [f"{k} {v:.1f} ms ({v / step:.0%})" for k, v in prof["ranges_ms"].items()]
            parts += [f"{k} {v:.1f} ms ({v / step:.0%})" for k, v in list(prof["backward_ms"].items())[:3]]
            lines.append(f"- {row['model']} [{row['attention']}] {mode}: {prof['step_ms']:.1f} ms of {prof['clock']} "
                         f"op time; " + "; ".join(parts) + f" (`{prof['table']}`)")
    return lines


def markdown_document(command, header, table, rows, complete, profiled):
    """The Markdown output: the command, the header lines, the table and (``profiled``) the profile lines."""
    status = [] if complete else ["", "**partial: the run was interrupted or is still running**"]
    md = (["# Detector benchmark (tools/benchmark.py)", "", f"`{command}`", ""] + [f"- {h}" for h in header]
          + status + ["", table, ""])
    if profiled:
        md += ["## torch.profiler, one step each (inclusive times; share of the step's op time)", ""]
        md += profile_lines(rows) + [""]
    return "\n".join(md)


def write_atomic(path, text):
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)

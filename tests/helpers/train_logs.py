"""What the tests read from open_clip_train's log lines."""
import re
from statistics import mean


def epoch_means(log: str) -> dict:
    """Each loss term's mean per epoch, from the "Train Epoch" lines."""
    per = {}
    for line in log.splitlines():
        m = re.search(r"Train Epoch: (\d+)", line)
        if m:
            for key, val in re.findall(r"(\w+_loss): ([-\d.e+]+) \(", line):
                per.setdefault(key, {}).setdefault(int(m.group(1)), []).append(float(val))
    return {k: {e: mean(v) for e, v in ep.items()} for k, ep in per.items()}

"""How a run reports its progress: a tqdm bar over epochs, or per-epoch lines with ``verbose``."""

from __future__ import annotations

from collections.abc import Callable

from lop_jax.config import Config


class Progress:
    """The progress display of one run (or of several runs trained together, as one bar)."""

    def __init__(self, cfg: Config, label: str, verbose: bool, enabled: bool = True,
                 log: Callable[[str], None] = print):
        self.verbose, self.enabled, self.log = verbose, enabled, log
        self.bar = None
        if enabled and not verbose:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.num_epochs, desc=label, unit="epoch")

    def start(self, epoch: int) -> None:
        if self.bar is not None:
            self.bar.n = epoch
            self.bar.refresh()

    def train_summary(self, step: int, acc: float) -> None:
        if self.enabled and self.verbose:
            self.log(f"\t\tstep {step}: running train accuracy {acc:.4f}")

    def epoch(self, epoch: int, task: int, test_acc: float, val_acc: float, seconds: float) -> None:
        if not self.enabled:
            return
        if self.verbose:
            self.log(f"\tepoch {epoch + 1} (task {task + 1}): test accuracy {test_acc:.4f}, "
                     f"validation accuracy {val_acc:.4f}, epoch run time {seconds:.2f} s")
        else:
            self.bar.set_postfix(task=task + 1, test_acc=f"{test_acc:.3f}", val_acc=f"{val_acc:.3f}")
            self.bar.update(1)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""One line of lr_pilot.txt: label, learning rate, validation accuracy and loss, test accuracy, seconds."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import read_metrics  # noqa: E402

label, lr, metrics, seconds = sys.argv[1:5]
note = f"  {sys.argv[5].strip()}" if len(sys.argv) > 5 and sys.argv[5].strip() else ""
last = read_metrics(Path(metrics))
print(f"{label:12s} lr {lr:6s} val/acc {last['val/acc']:.4f}  val/loss {last['val/loss']:.4f}  "
      f"test/acc {last['test/acc']:.4f}  {seconds:>4s} s{note}")

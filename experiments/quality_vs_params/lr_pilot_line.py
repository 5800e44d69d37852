"""One line of lr_pilot.txt: label, learning rate, validation accuracy and loss, test accuracy, seconds."""

import csv
import sys

label, lr, metrics, seconds = sys.argv[1:5]
note = f"  {sys.argv[5]}" if len(sys.argv) > 5 else ""
last = {}
with open(metrics, newline="") as f:
    for row in csv.DictReader(f):
        last.update({k: v for k, v in row.items() if v})
print(f"{label:12s} lr {lr:6s} val/acc {float(last['val/acc']):.4f}  val/loss {float(last['val/loss']):.4f}  "
      f"test/acc {float(last['test/acc']):.4f}  {seconds:>4s} s{note}")

"""The run's loss figure: drawn without pyplot, from the metrics records."""

import subprocess
import sys

import matplotlib.image

from pretrain.curves import plot_loss_curves
from tests.train_utils import REPO


def test_loss_figure_is_a_png_of_the_requested_size(tmp_path):
    records = [{"step": s, "train/loss": 5.0 / s} for s in range(1, 11)]
    records += [{"step": 5, "val/loss": 1.5}, {"step": 10, "val/loss": 0.9, "train/loss": None}]
    path = tmp_path / "loss.png"
    plot_loss_curves(records, path)
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (400, 640)  # 6.4 x 4.0 inches at 100 dpi
    assert image[..., :3].min() < 0.5  # something was drawn on the white canvas


def test_importing_and_plotting_leaves_pyplot_alone(tmp_path):
    code = "\n".join(["import sys", "from pathlib import Path", "from pretrain.curves import plot_loss_curves",
                      f"plot_loss_curves([{{'step': 1, 'train/loss': 1.0}}], Path({str(tmp_path / 'a.png')!r}))",
                      "print('matplotlib.pyplot' in sys.modules)"])
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

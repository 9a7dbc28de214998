"""Small matplotlib helpers that write PNG files.

They draw on `matplotlib.figure.Figure` objects, which render with the Agg
backend without touching pyplot's global state, so they are safe in headless
runs and do not change the backend of a user's notebook.
"""

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _new_figure(figsize=(5.0, 4.0)) -> Figure:
  fig = Figure(figsize=figsize, dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str) -> str:
  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, format="png")
  return path


def _check_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> None:
  if not curves:
    raise ValueError("curves must be a non-empty mapping name -> (x, y)")
  for name, xy in curves.items():
    if len(xy) != 2 or np.shape(xy[0]) != np.shape(xy[1]) or np.ndim(xy[0]) != 1:
      raise ValueError(f"curve {name!r} must be (x, y) with equal 1-D shapes")


def _label_axes(ax, title: str, xlabel: str, ylabel: str, logx: bool, logy: bool) -> None:
  ax.set_xscale("log" if logx else "linear")
  ax.set_yscale("log" if logy else "linear")
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize="small")


def line_plot(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str,
              title: str = "", xlabel: str = "", ylabel: str = "", *, logx: bool = False,
              logy: bool = False) -> str:
  """One line per named curve; returns the PNG path."""
  _check_curves(curves)
  fig = _new_figure()
  ax = fig.add_subplot(1, 1, 1)
  for name, (x, y) in curves.items():
    x, y = np.asarray(x, float), np.asarray(y, float)
    if logx or logy:
      # Zero or negative points cannot be drawn on a log axis.
      keep = np.ones_like(x, bool)
      keep &= x > 0 if logx else keep
      keep &= y > 0 if logy else keep
      x, y = x[keep], y[keep]
    ax.plot(x, y, label=name)
  _label_axes(ax, title, xlabel, ylabel, logx, logy)
  return _save(fig, path)


def loglog_plot(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str,
                title: str = "", xlabel: str = "T", ylabel: str = "duality gap") -> str:
  """Log-log plot (e.g. duality gap vs rounds T per method); returns the PNG path."""
  return line_plot(curves, path, title, xlabel, ylabel, logx=True, logy=True)


def heatmap(matrix, labels: Sequence[str], path: str, title: str = "", *, vmin: float = 0.0,
            vmax: float = 1.0) -> str:
  """Annotated square heat map (e.g. a win-rate matrix, hence [0, 1] colours); returns the path."""
  matrix = np.asarray(matrix, float)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f"matrix must be square 2-D, got shape {matrix.shape}")
  if len(labels) != matrix.shape[0]:
    raise ValueError(f"labels has {len(labels)} entries, expected {matrix.shape[0]}")
  n = matrix.shape[0]
  fig = _new_figure(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
  ax = fig.add_subplot(1, 1, 1)
  im = ax.imshow(matrix, cmap="RdBu_r", vmin=vmin, vmax=vmax)
  ax.set_xticks(range(n), labels=list(labels), rotation=45, ha="right")
  ax.set_yticks(range(n), labels=list(labels))
  if n <= 16:
    for i in range(n):
      for j in range(n):
        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7)
  fig.colorbar(im, ax=ax)
  ax.set_title(title)
  return _save(fig, path)


def band_plot(curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
              path: str, title: str = "", xlabel: str = "", ylabel: str = "", *,
              logx: bool = False, logy: bool = False) -> str:
  """Mean curves with a shaded interval: name -> (x, mean, half-width); returns the PNG path."""
  fig = _new_figure()
  ax = fig.add_subplot(1, 1, 1)
  for name, (x, mean, half) in curves.items():
    x, mean, half = (np.asarray(v, float) for v in (x, mean, half))
    if not x.shape == mean.shape == half.shape or x.ndim != 1:
      raise ValueError(f"curve {name!r}: x, mean and half-width must be 1-D of one length")
    keep = np.ones_like(x, bool)
    if logx:
      keep &= x > 0
    if logy:
      keep &= mean > 0
    x, mean, half = x[keep], mean[keep], half[keep]
    (line,) = ax.plot(x, mean, label=name)
    low = np.maximum(mean - half, mean * 1e-3) if logy else mean - half
    ax.fill_between(x, low, mean + half, color=line.get_color(), alpha=0.2, linewidth=0)
  _label_axes(ax, title, xlabel, ylabel, logx, logy)
  return _save(fig, path)

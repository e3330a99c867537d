"""The `edgegpt info` command: versions, onnxruntime's execution providers, whether CUDA is usable."""

from __future__ import annotations

import sys

import click

from edgegpt import __version__
from edgegpt.cli.support import Command

__all__ = ["info_command"]


@click.command("info", cls=Command)
def info_command():
    """Package versions, onnxruntime execution providers and whether CUDA is usable.

    \b
    Examples:
      edgegpt info
    """
    import importlib.metadata as md
    import platform

    click.echo(f"edgegpt {__version__} on Python {platform.python_version()} ({platform.machine()})")
    for dist in (
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-genai",
        "numpy",
        "tokenizers",
        "click",
        "torch",
        "onnx",
    ):
        try:
            click.echo(f"  {dist:<18} {md.version(dist)}")
        except md.PackageNotFoundError:
            click.echo(f"  {dist:<18} -")
    import onnxruntime as ort

    providers = ort.get_available_providers()
    click.echo(f"onnxruntime providers: {', '.join(providers)}")
    cuda = "CUDAExecutionProvider" in providers
    click.echo(
        f"CUDA for onnxruntime: {'available' if cuda else 'not available (install edgegpt[gpu] on a CUDA machine)'}"
    )
    if "torch" in sys.modules or _installed("torch"):
        import torch

        click.echo(
            f"CUDA for torch: {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}"
        )


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None

"""`ffdist models`: the names `model.name` accepts."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from ffdist.models import available

    print("\n".join(available()))
    print("timm/<name>: any of timm.list_models() (pip install 'ffdist[timm]')")
    return 0

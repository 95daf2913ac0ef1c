"""``wsvd report DIR``: the markdown report with PNG plots of a ``wsvd compress --out`` directory."""

from __future__ import annotations


def add_parser(sub) -> None:
    rp = sub.add_parser("report", help="markdown report with PNG plots of a `wsvd compress --out` directory")
    rp.add_argument("dir", help="directory written by wsvd compress --out")
    rp.add_argument("--out", help="where to write report.md and the PNGs (default: DIR)")
    rp.set_defaults(run=cmd_report)


def cmd_report(args) -> None:
    from ..artifacts.report import write_report

    print(write_report(args.dir, args.out))

"""Regenerate profiles/: estimate-based plans for reference networks and GPU sizes.

    python tools/make_profiles.py            # ResNet-18/34/50 x 4096/8192/16384 x 16-80 GiB

Plans are made without a GPU (``--no-measure``): memory from meta-tensor estimates, no
predicted times (``predicted_time_s: null``, ``time_fit: null``; the tile is chosen by pixels
processed), and ``verification: {status: off}``. A budget that no tile fits writes no file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from executor import save_plan
from tileplan.planning.profile import NoFeasiblePlanError, ProfileRequest, profile
from tileplan.units import GIB, format_shape

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("make_profiles")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = ROOT / "profiles"
    for net in ("resnet18", "resnet34", "resnet50"):
        for size in (4096, 8192, 16384):
            for gib in (16, 24, 40, 80):
                request = ProfileRequest(
                    model_file=Path("examples") / f"{net}.py", image_shape=(size, size),
                    device="cuda", budget_bytes=gib * GIB, measure=False,
                )  # fmt: skip
                name = f"{net}_{size}_{gib}GiB.yaml"
                try:
                    plan = profile(request)
                except NoFeasiblePlanError as err:
                    (out / name).unlink(missing_ok=True)
                    log.info("%s: not written: %s", name, err)
                    continue
                save_plan(plan, out / name)
                log.info("%s: tile %s", name, format_shape(plan.tile_px))


if __name__ == "__main__":
    main()

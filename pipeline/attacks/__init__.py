"""Attacks: a registry of declarations (``base``), one file per attack (``methods/``), the pieces they are built
from (``core``), the stored uint8 form and its rounding-aware finish (``lattice``), and the one way to run
them (``run``).

Single-step methods (``fgsm``, ``fgm``, ``fgm_l2``, ``d_fgsm``, ``d_fgm``) are
functions of the clean image and its loss gradient only: one forward+backward
serves all of them at every epsilon (``Attack.shares_gradient``).
"""

from __future__ import annotations

from advgen.attacks import methods  # noqa: F401  (registers every attack)
from advgen.attacks.base import PARAMS, REGISTRY, Attack, Context, Outcome, Param, Params, declares, get, help_of, \
    param, register
from advgen.attacks.core import Direction, Norm, best_of_restarts, default_step_size, least_likely, loss_gradient, \
    random_start, restart_seeds, sample_seed
from advgen.attacks.lattice import ball_steps, deepfool_on_lattice, finish_on_lattice, lattice_step, to_uint8
from advgen.attacks.methods.bim import bim, d_bim
from advgen.attacks.methods.deepfool import DeepFoolResult, deepfool, project_onto
from advgen.attacks.methods.fgm import d_fgm, fgm, fgm_l2
from advgen.attacks.methods.fgs_until import FGS_UNTIL_STEP, fgs_until
from advgen.attacks.methods.fgsm import d_fgsm, fgsm
from advgen.attacks.methods.illc import illc_fast, illc_iter
from advgen.attacks.methods.pgd import pgd, pgd_l2
from advgen.attacks.methods.uap import UapFit, fit_uap, fooling_rate, uap
from advgen.attacks.run import check, check_model_and_input, check_output, execute, run, stored

METHODS = REGISTRY  # name -> Attack, in registration order

__all__ = [
    "FGS_UNTIL_STEP", "METHODS", "PARAMS", "REGISTRY", "Attack", "Context", "DeepFoolResult", "Direction", "Norm",
    "Outcome", "Param", "Params", "UapFit", "ball_steps", "best_of_restarts", "bim", "check", "check_model_and_input",
    "check_output", "d_bim", "declares", "d_fgm", "d_fgsm", "deepfool", "deepfool_on_lattice", "default_step_size", "execute",
    "fgm", "fgm_l2", "fgs_until", "fgsm", "finish_on_lattice", "fit_uap", "fooling_rate", "get", "help_of",
    "illc_fast", "illc_iter", "lattice_step", "least_likely", "loss_gradient", "param", "pgd", "pgd_l2",
    "project_onto", "random_start", "register", "restart_seeds", "run", "sample_seed", "stored", "to_uint8", "uap",
]

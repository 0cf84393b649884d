"""The attacks, one file each; importing a file registers its attacks (``advgen.attacks.base.register``).

To add one, see docs/ARCHITECTURE.md: a new file here and its name in the line below.
"""

from advgen.attacks.methods import fgsm, fgm, bim, mi_fgsm, illc, pgd, deepfool, fgs_until, uap  # noqa: F401, I001  (registration, in listing order)

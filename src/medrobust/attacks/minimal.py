"""Minimum-norm attacks: how far is the nearest adversarial example?

* :class:`~medrobust.attacks.deepfool.DeepFool` (Moosavi-Dezfooli et al., CVPR 2016)
* :class:`~medrobust.attacks.carlini_wagner.CarliniWagnerL2` (Carlini & Wagner, S&P 2017)
* :class:`~medrobust.attacks.ead.EAD` (Chen et al., AAAI 2018)
* :class:`~medrobust.attacks.lbfgs.LBFGS` (Szegedy et al., ICLR 2014)

One module per attack, so that each reads against its paper; this module gathers them.
"""

from __future__ import annotations

from medrobust.attacks.carlini_wagner import CarliniWagnerL2
from medrobust.attacks.deepfool import DeepFool
from medrobust.attacks.ead import EAD
from medrobust.attacks.lbfgs import LBFGS

__all__ = ["CarliniWagnerL2", "DeepFool", "EAD", "LBFGS"]

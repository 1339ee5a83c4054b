"""Minimum-norm attacks: how far is the nearest adversarial example?

* :class:`~medrobust.attacks.deepfool.DeepFool` (Moosavi-Dezfooli et al., CVPR 2016)
* :class:`~medrobust.attacks.carlini_wagner.CarliniWagnerL2` (Carlini & Wagner, S&P 2017)
* :class:`~medrobust.attacks.ead.EAD` (Chen et al., AAAI 2018)
* :class:`~medrobust.attacks.lbfgs.LBFGS` (Szegedy et al., ICLR 2014)
* :class:`~medrobust.attacks.ddn.DDN` (Rony et al., CVPR 2019)
* :class:`~medrobust.attacks.fmn.FMN` (Pintor et al., NeurIPS 2021)
* :class:`~medrobust.attacks.alma.ALMA` (Rony et al., ICCV 2021)

One module per attack, so that each reads against its paper; this module gathers them.
"""

from __future__ import annotations

from medrobust.attacks.alma import ALMA
from medrobust.attacks.carlini_wagner import CarliniWagnerL2
from medrobust.attacks.ddn import DDN
from medrobust.attacks.deepfool import DeepFool
from medrobust.attacks.ead import EAD
from medrobust.attacks.fmn import FMN
from medrobust.attacks.lbfgs import LBFGS

__all__ = ["ALMA", "DDN", "EAD", "FMN", "LBFGS", "CarliniWagnerL2", "DeepFool"]

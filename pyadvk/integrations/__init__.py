"""pyadvk inside other training frameworks.

* :mod:`pyadvk.integrations.lightning`: a Lightning callback that measures robust accuracy (PGD or
  AutoAttack) every N epochs, and an adversarial-training ``training_step`` helper built on
  :mod:`pyadvk.train`'s losses. Needs ``lightning`` (``pip install pyadvk[lightning]``); importing
  this package does not import it.
"""

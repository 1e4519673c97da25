"""Example model families shipped with soctune, each a subpackage holding everything specific to
it: how its shipped models were trained, its rewards and its evaluator (``evaluator.py``, which
registers under the name a model folder's ``soctune.json`` declares; see
:func:`soctune.evaluation.evaluator_for`). The runtime never imports these packages by name: it
reaches them only through the reward and evaluator registries."""

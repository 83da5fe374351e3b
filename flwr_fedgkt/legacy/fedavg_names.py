"""``FedAvg``'s argument names on :class:`~flwr_fedgkt.legacy.LegacyFedGKT`.

A ``server_fn`` that built ``FedAvg(fraction_fit=..., min_fit_clients=...)`` keeps
those arguments when it swaps in ``LegacyFedGKT``: the ones that mean the same in
FedGKT are taken under either name (:data:`FEDAVG_NAMES`); the ones FedGKT has no
meaning for (:data:`NO_MEANING`) are a ``TypeError`` that says why, as is any
other argument the strategy does not know.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Collection, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from flwr.server.strategy import FedAvg

from ..rounds import RoundEngine

__all__ = [
    "FEDAVG_NAMES",
    "NO_MEANING",
    "SAME_NAMES",
    "fedavg_arguments",
    "fedgkt_arguments",
    "takes_fedavg_names",
]

FEDAVG_NAMES = {
    "fraction_fit": "fraction_train",
    "min_fit_clients": "min_train_nodes",
    "min_evaluate_clients": "min_evaluate_nodes",
    "min_available_clients": "min_available_nodes",
}
"""``FedAvg``'s name: ``LegacyFedGKT``'s, for the arguments that mean the same but
are spelt differently."""
SAME_NAMES = ("fraction_evaluate", "on_fit_config_fn", "on_evaluate_config_fn", "evaluate_fn")
"""``FedAvg``'s arguments that ``LegacyFedGKT`` takes under the same name."""

_NO_WEIGHTS = "FedGKT averages no weights; the server model is the ServerTrainer's"
_OWN_RECORD = (
    "FedGKT's round metrics are its own round record (accuracy, losses, bytes, "
    "rejected replies), which on_round_end receives"
)
NO_MEANING = {
    "initial_parameters": _NO_WEIGHTS,
    "inplace": _NO_WEIGHTS,
    "accept_failures": (
        "a failed client is always recorded (failed_nodes in the round's record) and the "
        "round goes on with the replies that came"
    ),
    "fit_metrics_aggregation_fn": _OWN_RECORD,
    "evaluate_metrics_aggregation_fn": _OWN_RECORD,
}
"""``FedAvg``'s arguments that FedGKT has no meaning for: why, by name."""


def fedavg_arguments() -> set[str]:
    """The names of the installed Flower's ``FedAvg`` arguments."""
    return set(inspect.signature(FedAvg).parameters)


def _engine_arguments() -> set[str] | None:
    """The keyword arguments the round engine takes (None: any)."""
    parameters = inspect.signature(RoundEngine).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def fedgkt_arguments(
    owner: str, given: Mapping[str, Any], named: Collection[str], known: Collection[str] | None
) -> dict[str, Any]:
    """``given`` keyword arguments with ``FedAvg``'s names in FedGKT's spelling.

    ``named`` are the arguments given under FedGKT's names (by position or by
    keyword); ``known`` all the names FedGKT takes (None: any). A ``TypeError``
    naming ``owner`` for an argument FedGKT has no meaning for, for one option
    given under both its names, and for an unknown name.
    """
    arguments: dict[str, Any] = {}
    for name, value in given.items():
        if name in NO_MEANING:
            raise TypeError(f"{owner}: {name!r} has no meaning here: {NO_MEANING[name]}")
        fedgkt_name = FEDAVG_NAMES.get(name, name)
        if fedgkt_name != name and (fedgkt_name in named or fedgkt_name in given):
            raise TypeError(
                f"{owner}: got {fedgkt_name!r} and {name!r} (FedAvg's name for it); give one"
            )
        if known is not None and fedgkt_name not in known:
            if name in fedavg_arguments():  # one that a newer Flower added
                raise TypeError(f"{owner}: FedAvg's {name!r} has no meaning here")
            close = difflib.get_close_matches(name, [*known, *FEDAVG_NAMES], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{owner} got an unexpected keyword argument {name!r}{hint}")
        arguments[fedgkt_name] = value
    return arguments


S = TypeVar("S")
P = ParamSpec("P")


def takes_fedavg_names(
    init: Callable[Concatenate[S, P], None],
) -> Callable[Concatenate[S, P], None]:
    """Decorate a strategy's ``__init__`` so that it takes ``FedAvg``'s argument
    names too (:func:`fedgkt_arguments`); the keyword arguments it does not name
    itself go to the :class:`~flwr_fedgkt.rounds.RoundEngine`, and must be the
    engine's."""
    signature = inspect.signature(init)
    own = {
        p.name
        for p in signature.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }

    @functools.wraps(init)
    def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> None:
        owner = type(self).__name__
        named = signature.bind_partial(self, *args).arguments.keys() | kwargs.keys()
        engine = _engine_arguments()
        known = None if engine is None else own | engine
        cast(Any, init)(self, *args, **fedgkt_arguments(owner, kwargs, named, known))

    return wrapper

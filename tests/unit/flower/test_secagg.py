"""The ClientApp's side of SecAgg+ under ``client-distributed`` (issue 19), without a simulation.

The set-up stage is refused when the server asks for another threshold or range than the site's
own config implies; the masked-vector stage's train reply is the legacy ``FitRes`` layout with the
encoded noisy update, weight 1 and no metrics, and ``secaggplus_mod`` leaves only masked integers.
"""

from __future__ import annotations

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedmeta.experiment import Experiment
from fedmeta.flower.client_app import build_client_app
from fedmeta.flower.secagg import KEYS_KEY
from fedmeta.privacy.mechanisms import mechanism_for
from fedmeta.privacy.secure_sum import CONTROL_SIZE
from tests.privacy_helpers import dp_config


def _message(content: RecordDict, mid: str = "m1") -> Message:
    meta = Metadata(
        run_id=1, message_id=mid, src_node_id=0, dst_node_id=5, reply_to_message_id="",
        group_id="1", created_at=0.0, ttl=600.0, message_type="train",
    )  # fmt: skip
    return Message(metadata=meta, content=content)


def _context() -> Context:
    return Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})


def _setup(exp: Experiment, **override: float) -> RecordDict:
    mech = mechanism_for(exp.cfg)
    fp = mech.fixed_point(exp.cfg, exp.initial_meta_params())
    assert fp is not None
    cfg = {
        Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3,
        Key.THRESHOLD: mech.min_survivors(exp.cfg), Key.CLIPPING_RANGE: fp.clipping_range,
        Key.TARGET_RANGE: fp.quantization_range, Key.MOD_RANGE: fp.modulus, Key.MAX_WEIGHT: 1.0, **override,
    }  # fmt: skip
    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(cfg)})  # type: ignore[arg-type]


def test_a_setup_with_another_threshold_or_range_is_refused_and_the_own_one_accepted() -> None:
    cfg = dp_config("client-distributed", total=3, per_round=3, min_survivors=2)
    exp = Experiment(cfg)
    app = build_client_app(cfg)
    # an exception in a mod becomes the node's error reply (Flower's runtime turns it into one)
    with pytest.raises(ValueError, match=r"the server's SecAgg\+ set-up has threshold=1; .* implies 2: refused"):
        app(_message(_setup(exp, **{Key.THRESHOLD: 1})), _context())  # type: ignore[operator]
    with pytest.raises(ValueError, match=r"set-up has clipping_range=0.5"):
        app(_message(_setup(exp, **{Key.CLIPPING_RANGE: 0.5})), _context())  # type: ignore[operator]
    reply = app(_message(_setup(exp)), _context())  # type: ignore[operator]
    assert not reply.has_error()
    keys = reply.content.config_records[RECORD_KEY_CONFIGS]
    assert set(keys) == {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}


def test_the_masked_vector_stage_replies_in_the_legacy_layout_with_no_metrics() -> None:
    from fedmeta.flower.secagg import secure_train_reply

    cfg = dp_config("client-distributed", total=3, per_round=3, min_survivors=2)
    exp = Experiment(cfg)
    meta = exp.initial_meta_params()
    keys = list(meta)
    params = ndarrays_to_parameters([meta[k].numpy() for k in keys])
    fitins = FitIns(params, {"round": 1, "client-id": 0, KEYS_KEY: ",".join(keys)})
    reply = secure_train_reply(exp, _message(compat.fitins_to_recorddict(fitins, True)), None)
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert fitres.num_examples == 1 and fitres.metrics == {}
    from flwr.common import parameters_to_ndarrays

    arrays = parameters_to_ndarrays(fitres.parameters)
    assert len(arrays) == len(keys) + 1 and arrays[-1].shape == (CONTROL_SIZE,)
    fp = mechanism_for(cfg).fixed_point(cfg, meta)
    assert fp is not None
    assert all(float(np.abs(a).max()) <= fp.clipping_range for a in arrays)
    assert arrays[-1][0] == pytest.approx(fp.clipping_range / 2)


def test_a_node_proxy_refuses_legacy_calls_that_would_bypass_the_protocol() -> None:
    import pytest

    from fedmeta.flower.secagg import _NodeProxy

    proxy = _NodeProxy(7)
    assert proxy.node_id == 7 and proxy.cid == "7"
    with pytest.raises(NotImplementedError, match="node 7: fit is not a SecAgg\\+ step"):
        proxy.fit(None, None, None)

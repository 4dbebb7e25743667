"""Settings on the wire: one to_record/from_record pair, the same values on both ends, defaults for keys a record lacks."""

from __future__ import annotations

from flwr.app import ConfigRecord

from strategies import keys
from strategies.iau_fed import GradientQuery
from strategies.methods.imu import IMUWireSettings
from strategies.methods.pga import PGAWireSettings


def test_settings_survive_the_wire_with_their_types():
    query = GradientQuery(
        model_version="abc",
        role=keys.ROLE_REMAINING,
        request='{"client": 1}',
        remaining_count=7,
        forget_count=3,
        correction=False,
        correction_weight=2.5,
        allow_stale=True,
        gradient_dtype="float64",
    )
    record = query.to_record()
    # The keys a client reads, written once (strategies/keys.py), with the values as sent.
    assert record[keys.ROLE] == "remaining" and record[keys.REMAINING_COUNT] == 7 and record[keys.CORRECTION] is False
    assert GradientQuery.from_record(record) == query
    pga = PGAWireSettings(lr=0.02, epochs=3, batch_size=16, radius=0.5, stop_distance=1.5)
    assert PGAWireSettings.from_record(pga.to_record()) == pga
    imu = IMUWireSettings(lr=0.003, epochs=2, batch_size=8)
    assert IMUWireSettings.from_record(imu.to_record()) == imu


def test_a_key_the_record_lacks_leaves_the_default():
    record = ConfigRecord(
        {keys.MODEL_VERSION: "v", keys.ROLE: keys.ROLE_FORGET_ONLY, keys.REQUEST: "{}", keys.REMAINING_COUNT: 1, keys.FORGET_COUNT: 1}
    )
    query = GradientQuery.from_record(record)
    assert query.correction is True and query.correction_weight == 1.0 and query.gradient_dtype == "float32"
    assert PGAWireSettings.from_record(ConfigRecord({keys.LR: 0.5})) == PGAWireSettings(lr=0.5)

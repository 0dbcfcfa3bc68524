"""The spec's ``hardware:`` block: the accelerator fields it fixes, those it searches, and the user devices.

Every :class:`~hwcost.accelerator.Accelerator` field (``dataclasses.fields(Accelerator)``) may be given a YAML
list of choices; no Accelerator value is natively a list, so a list always means choices (a mapping field is
searched as a list of mappings). A list of one choice fixes the field. ``devices_file: PATH`` (not an
Accelerator field) names a devices file (:func:`hwcost.devices.load_devices_file`) whose boards the device
may name; :func:`dse.spec.load_spec` resolves a relative path against the spec file's directory.

:func:`parse_hardware` validates the block: every choice is built into an Accelerator with the other fields
(at their first choice), and so is every combination of the choices (all pairs of choices when the
combinations exceed :data:`MAX_COMBINATIONS`), so an invalid value or pair is one line naming the field and
the index, ``hardware.clock_mhz[1]: 5000 is not a number in [1, 1000] MHz``. The Optuna side (one
categorical ``hw.<field>`` per searched field) is in :mod:`dse.space`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dse.schema import SchemaError, unknown_key
from hwcost.accelerator import Accelerator, AcceleratorError
from hwcost.devices import Device, DeviceFileError, load_devices_file, user_devices

DEVICES_FILE = "devices_file"
MAX_COMBINATIONS = 4096
"""Above this many combinations of choices, every pair of choices is validated instead of every combination."""
_FIELD_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(.*)$")


def accelerator_fields() -> list[str]:
    """The Accelerator's fields a file may give, in declaration order."""
    internal = getattr(Accelerator, "__schema_internal__", ())
    return [f.name for f in dataclasses.fields(Accelerator) if f.name not in internal]


def searched_hardware(hardware: dict) -> dict[str, list]:
    """The searched fields of a ``hardware:`` mapping (a spec's, or one stored with a study): field -> its
    choices (a list of two or more)."""
    return {k: list(v) for k, v in hardware.items() if isinstance(v, (list, tuple)) and len(v) > 1}


def encode_choice(value: Any) -> Any:
    """A choice as an Optuna categorical accepts it (and a table cell shows it): None, bool, int, float and str
    as they are, anything else (a mapping) as its JSON text with sorted keys (stable)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


@dataclasses.dataclass(frozen=True)
class HardwareSpace:
    """The validated ``hardware:`` block: ``fixed`` fields (as given), ``searched`` fields with their choices
    (as given, in order, two or more), and the user ``devices`` of ``devices_file``."""

    fixed: dict
    searched: dict
    devices: dict = dataclasses.field(default_factory=dict)
    devices_file: str | None = None

    @contextmanager
    def active(self) -> Iterator[None]:
        """The devices file's boards known to :func:`hwcost.get_device` (and so to ``estimate``) inside."""
        with user_devices(self.devices):
            yield

    def values(self, choice: dict | None = None) -> dict:
        """The Accelerator fields of a combination: the fixed ones, ``choice`` (field -> raw choice), and the
        first choice of every searched field ``choice`` leaves out."""
        choice = choice or {}
        return {**self.fixed, **{k: choice[k] if k in choice else c[0] for k, c in self.searched.items()}}

    def build(self, choice: dict | None = None, prefix: str = "hardware") -> Accelerator:
        """The Accelerator of a combination (:meth:`values`); AcceleratorError naming ``<prefix>.<field>``."""
        with self.active():
            return Accelerator.from_dict(self.values(choice), prefix=prefix)

    def choices(self, name: str) -> list:
        """The values field ``name`` may take: its choices, its fixed value, or [] when the block leaves it out."""
        if name in self.searched:
            return list(self.searched[name])
        return [self.fixed[name]] if name in self.fixed else []

    def first(self) -> Accelerator:
        """The accelerator of every field's first choice (the whole accelerator when nothing is searched)."""
        return self.build()

    def encoded(self, name: str) -> tuple:
        """The Optuna choices of searched field ``name`` (:func:`encode_choice`)."""
        return tuple(encode_choice(c) for c in self.searched[name])

    def decode(self, name: str, value: Any) -> Any:
        """The raw choice of field ``name`` whose Optuna value is ``value``; ValueError if it is none of them."""
        encoded = self.encoded(name)
        for i, e in enumerate(encoded):
            if e == value and type(e) is type(value):
                return self.searched[name][i]
        if value in encoded:
            return self.searched[name][encoded.index(value)]
        raise ValueError(f"hw.{name}: {value!r} is not one of the spec's choices {list(encoded)}")

    def searched_values(self, accel: Accelerator) -> dict:
        """The searched fields of ``accel`` (its :meth:`~Accelerator.to_dict` values): a trial's small
        ``accelerator`` attribute; {} when nothing is searched."""
        full = accel.to_dict()
        return {k: full[k] for k in self.searched}

    def device_names(self) -> list[str]:
        """The device names the block may use (the fixed one, or the choices)."""
        return list(self.searched["device"]) if "device" in self.searched else [self.fixed.get("device")]

    def user_device_entries(self) -> dict[str, dict]:
        """Devices-file entries (:func:`device_entry`) of the user devices the block may use."""
        return {name: device_entry(self.devices[name]) for name in self.device_names() if name in self.devices}


def device_entry(device: Device) -> dict:
    """``device`` as an entry of a devices file: :meth:`~hwcost.devices.Device.to_dict` less the name (the key),
    which :func:`hwcost.devices.parse_devices` reads back to an equal Device."""
    return {k: v for k, v in device.to_dict().items() if k != "name"}


# --------------------------------------------------------------------------- validation
class HardwareError(SchemaError):
    """A problem in the ``hardware:`` block; ``path`` is relative to it (``clock_mhz[1]``)."""


def _load_devices(path: Any) -> dict[str, Device]:
    if not isinstance(path, str) or not path.strip():
        raise HardwareError(DEVICES_FILE, f"{path!r} is not a path to a devices file")
    if not Path(path).is_file():
        raise HardwareError(DEVICES_FILE, f"devices file '{path}' does not exist")
    try:
        return load_devices_file(Path(path))
    except DeviceFileError as err:
        raise HardwareError(DEVICES_FILE, f"{path}: {err}" if err.path else str(err)) from None


def parse_hardware(value: dict) -> HardwareSpace:
    """Validate the ``hardware:`` mapping (module docstring); :class:`HardwareError` (one line, its path under
    ``hardware``) on the first problem."""
    names = accelerator_fields()
    for key in value:
        if key not in names and key != DEVICES_FILE:
            raise HardwareError(str(key), unknown_key(key, [*names, DEVICES_FILE], "unknown key"))
    devices = _load_devices(value[DEVICES_FILE]) if value.get(DEVICES_FILE) is not None else {}
    fixed, searched = {}, {}
    for key, v in value.items():
        if key == DEVICES_FILE:
            continue
        if isinstance(v, (list, tuple)):
            if not v:
                raise HardwareError(key, "expected a value or a non-empty list of choices")
            if len(v) == 1:
                fixed[key] = v[0]
            else:
                searched[key] = tuple(v)
        else:
            fixed[key] = v
    space = HardwareSpace(fixed, searched, devices, value.get(DEVICES_FILE))
    _check_combinations(space)
    return space


def _fail(space: HardwareSpace, err: AcceleratorError, index: dict[str, int]) -> HardwareError:
    """The combination ``index`` (field -> choice index) failed with ``err``: the path names the field's index
    when the field is searched, and the other fields off their first choice are named after the message."""
    match = _FIELD_RE.match(err.path)
    field, rest = (match.group(1), match.group(2)) if match else ("", err.path)
    path = f"{field}[{index[field]}]{rest}" if field in space.searched else err.path
    others = [f"{k}[{i}] {space.searched[k][i]!r}" for k, i in index.items() if i and k != field]
    return HardwareError(path, err.message + (f" (with {', '.join(others)})" if others else ""))


def _check_combinations(space: HardwareSpace) -> None:
    """Every choice, with the other fields at their first choice, then every combination (or every pair)."""
    fields = list(space.searched)
    built: dict[tuple, Accelerator] = {}

    def check(index: dict[str, int]) -> Accelerator:
        key = tuple(index.get(k, 0) for k in fields)
        if key not in built:
            try:
                built[key] = space.build({k: space.searched[k][i] for k, i in index.items()}, prefix="")
            except AcceleratorError as err:
                raise _fail(space, err, dict(zip(fields, key))) from None
        return built[key]

    check({})
    for k in fields:
        values: list[str] = []
        for i in range(len(space.searched[k])):
            value = _canonical(check({k: i}).to_dict()[k])
            if value in values:
                raise HardwareError(f"{k}[{i}]", f"{space.searched[k][i]!r} is the same choice as {k}"
                                                 f"[{values.index(value)}]; list each choice once")
            values.append(value)
    sizes = [len(space.searched[k]) for k in fields]
    total = 1
    for n in sizes:
        total *= n
    if total <= MAX_COMBINATIONS:
        for combo in itertools.product(*(range(n) for n in sizes)):
            check(dict(zip(fields, combo)))
    else:
        for a, b in itertools.combinations(range(len(fields)), 2):
            for i, j in itertools.product(range(sizes[a]), range(sizes[b])):
                check({fields[a]: i, fields[b]: j})

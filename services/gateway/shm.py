"""System shared memory (Triton's shared memory extension) for clients on the gateway's host.

A client creates a POSIX shared memory object (``shm_open``: a file in /dev/shm on Linux), registers
a region of it under a name (SystemSharedMemoryRegister), and then names that region in an input's
or a requested output's ``shared_memory_region`` parameter instead of sending the tensor: the
gateway reads the input from the region before it enqueues the request, and writes the output into
the region when the reply comes (the reply then carries an empty raw entry for it, as Triton's
does). Regions belong to one gateway process: a client registers on the gateway it calls.

Regions also belong to the tenant of the API key that registered them (one anonymous tenant when
the gateway checks no keys): a region is known by ``(tenant, name)``, so two tenants may use the
same name, and another tenant's region answers exactly as a region that is not registered
(status, unregister and inference alike: no existence oracle). A shared memory object that one
tenant has registered is refused to another tenant as if it did not exist, so the gateway cannot
be made to read one tenant's tensors into another's call. SystemSharedMemoryStatus lists the
caller's tenant's regions; a ``system`` tenant key (the global administrator's) lists every
tenant's, naming other tenants' regions ``<tenant>/<name>``.

This module sees no protobuf: convert.py turns the messages into ``ShmRef`` values and back.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from services.common import auth
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

SHM_DIR = Path("/dev/shm")
"""Where Linux keeps POSIX shared memory objects (``shm_open(key)`` opens ``/dev/shm/<key>``)."""

REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
PARAMETERS = (REGION, BYTE_SIZE, OFFSET)
"""The tensor parameters of the extension (tritonclient's ``set_shared_memory`` sets them)."""


@dataclass(frozen=True)
class ShmRef:
    """Where one tensor's data lives: ``byte_size`` bytes at ``offset`` in a registered region."""

    kind: str
    """``input`` or ``output``."""
    tensor: str
    region: str
    byte_size: int
    offset: int = 0

    @property
    def where(self) -> str:
        """The tensor, as error messages name it."""
        return f"{self.kind} '{self.tensor}'"


@dataclass(frozen=True)
class ShmUse:
    """The shared memory one request uses."""

    inputs: tuple[ShmRef | None, ...] = ()
    """Per input, in request order: its region, or None when its data is in the request."""
    outputs: tuple[ShmRef, ...] = ()
    """The requested outputs to write into regions."""

    def __bool__(self) -> bool:
        return bool(self.outputs) or any(ref is not None for ref in self.inputs)

    @property
    def input_bytes(self) -> int:
        """Bytes the inputs in shared memory add to the request."""
        return sum(ref.byte_size for ref in self.inputs if ref is not None)


@dataclass(frozen=True)
class RegionStatus:
    """A registered region, as SystemSharedMemoryStatus reports it."""

    name: str
    key: str
    offset: int
    byte_size: int


def _int_parameter(where: str, parameters: Mapping[str, object], name: str) -> int | None:
    if name not in parameters:
        return None
    value = parameters[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{where}: parameter '{name}' must be an int64_param, got {value!r}")
    if value < 0:
        raise InvalidArgument(f"{where}: parameter '{name}' is {value}, expected a value >= 0")
    return value


def parse_ref(kind: str, tensor: str, parameters: Mapping[str, object]) -> ShmRef | None:
    """Read a tensor's shared memory parameters (as Triton does).

    Args:
        kind: ``input`` or ``output``.
        tensor: The tensor's name.
        parameters: The tensor's parameters by name, as plain values (str, int, bool, float).

    Returns:
        Where its data lives, or None when it names no region.

    Raises:
        InvalidArgument: A parameter of the wrong type or out of range, a byte size or offset
            without a region, a region without a byte size, or a region and a class count.
    """
    where = f"{kind} '{tensor}'"
    if REGION not in parameters:
        for name in (BYTE_SIZE, OFFSET):
            if name in parameters:
                raise InvalidArgument(f"{where}: parameter '{name}' cannot be given without '{REGION}'")
        return None
    region = parameters[REGION]
    if not isinstance(region, str) or not region:
        raise InvalidArgument(f"{where}: parameter '{REGION}' must be a non-empty string_param, got {region!r}")
    byte_size = _int_parameter(where, parameters, BYTE_SIZE)
    if byte_size is None:
        raise InvalidArgument(f"{where}: parameter '{BYTE_SIZE}' must be given along with '{REGION}'")
    offset = _int_parameter(where, parameters, OFFSET) or 0
    if "classification" in parameters:
        raise InvalidArgument(f"{where}: '{REGION}' and 'classification' cannot both be set (as in Triton)")
    return ShmRef(kind=kind, tensor=tensor, region=region, byte_size=byte_size, offset=offset)


def _tenant() -> str:
    """The calling key's tenant, whose regions the call sees ("" when the gateway checks no keys)."""
    identity = auth.current_identity()
    return "" if identity is None else identity.tenant


def _no_object(name: str, key: str) -> NotFound:
    return NotFound(
        f"failed to register shared memory region '{name}': no shared memory object '{key}' exists on "
        "the gateway's host (shared memory works only for clients on the same host)"
    )


def _object_name(key: str) -> str:
    # NOTE: shm_open(3) skips leading slashes and refuses a name with another slash in it.
    name = key.lstrip("/")
    if not name or "/" in name or name in (".", ".."):
        raise InvalidArgument(f"key '{key}' is not a POSIX shared memory name: expected '/name' with no other '/'")
    return name


class _Region:
    """One registered region: an open descriptor and a read/write mapping of the object's bytes."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int, fd: int) -> None:
        self.status = RegionStatus(name=name, key=key, offset=offset, byte_size=byte_size)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be page-aligned
        self._fd = fd
        self._skip = offset - start
        self._mmap = mmap.mmap(
            fd, self._skip + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=start
        )
        info = os.fstat(fd)
        self.object_id = (info.st_dev, info.st_ino)
        """The shared memory object's identity (whatever name or link it was opened by)."""
        self.users = 0
        """Requests in flight that use the region: it is unmapped when the last one ends."""
        self.unregistered = False

    @property
    def byte_size(self) -> int:
        return self.status.byte_size

    def _check_object(self, where: str, end: int) -> None:
        # NOTE: touching a mapping past the end of a file that shrank kills the process (SIGBUS).
        size = os.fstat(self._fd).st_size
        if size < self.status.offset + end:
            raise FailedPrecondition(
                f"{where}: shared memory object '{self.status.key}' shrank to {size} bytes, below region "
                f"'{self.status.name}' (offset {self.status.offset}, {self.byte_size} bytes); register it again"
            )

    def read(self, ref: ShmRef) -> bytes:
        end = ref.offset + ref.byte_size
        self._check_object(ref.where, end)
        return self._mmap[self._skip + ref.offset : self._skip + end]

    def write(self, ref: ShmRef, data: bytes) -> None:
        if len(data) > ref.byte_size:
            raise InvalidArgument(
                f"{ref.where}: the result has {len(data)} bytes, more than the {ref.byte_size} bytes given for it "
                f"in shared memory region '{ref.region}' ({BYTE_SIZE}); give it at least {len(data)}"
            )
        self._check_object(ref.where, ref.offset + len(data))
        start = self._skip + ref.offset
        self._mmap[start : start + len(data)] = data

    def close(self) -> None:
        self._mmap.close()
        os.close(self._fd)


class ShmLease:
    """The regions of one request, held (kept mapped) from before its inputs are read until its outputs are written."""

    def __init__(self, use: ShmUse, regions: dict[str, _Region]) -> None:
        self._use = use
        self._regions = regions

    def __enter__(self) -> ShmLease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for region in self._regions.values():
            region.users -= 1
            if region.users == 0 and region.unregistered:
                region.close()
        self._regions = {}

    def read_inputs(self) -> list[bytes | None]:
        """Each input's bytes from its region, in request order (None for inputs in the request).

        Raises:
            FailedPrecondition: A region's object shrank after it was registered.
        """
        return [None if ref is None else self._regions[ref.region].read(ref) for ref in self._use.inputs]

    def write_outputs(self, data: Mapping[str, bytes]) -> None:
        """Copy each output in shared memory into its region (outputs missing from ``data`` are skipped).

        Raises:
            InvalidArgument: An output is larger than the byte size given for it.
            FailedPrecondition: A region's object shrank after it was registered.
        """
        for ref in self._use.outputs:
            if ref.tensor in data:
                self._regions[ref.region].write(ref, data[ref.tensor])


class SharedMemoryRegistry:
    """This gateway process's registered system shared memory regions, by tenant and name.

    Every method acts for the calling key's tenant (``auth.current_identity``).
    """

    def __init__(self, directory: Path = SHM_DIR) -> None:
        self._directory = directory
        self._regions: dict[tuple[str, str], _Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map ``byte_size`` bytes at ``offset`` of the shared memory object ``key`` as region ``name``.

        Opening and mapping an object in /dev/shm (memory, not disk) does not block.

        Raises:
            InvalidArgument: No name, a malformed key, a zero size, or a range beyond the object's end.
            AlreadyExists: The caller's tenant has a region of that name registered.
            NotFound: No shared memory object ``key`` exists on the gateway's host, or another
                tenant has it registered (one message for both).
            FailedPrecondition: The gateway may not open the object.
        """
        if not name:
            raise InvalidArgument("name: give the shared memory region a name")
        object_name = _object_name(key)
        tenant = _tenant()
        if (tenant, name) in self._regions:
            raise AlreadyExists(f"shared memory region '{name}' is already registered; unregister it first")
        if byte_size <= 0:
            raise InvalidArgument(f"failed to register shared memory region '{name}': byte_size must be > 0")
        fd = self._open(name, key, object_name)
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidArgument(
                    f"failed to register shared memory region '{name}': offset {offset} + byte_size {byte_size} "
                    f"is beyond the end of shared memory object '{key}' ({size} bytes)"
                )
            region = _Region(name, key, offset, byte_size, fd)
        except BaseException:
            os.close(fd)
            raise
        if any(t != tenant and other.object_id == region.object_id for (t, _), other in self._regions.items()):
            region.close()
            raise _no_object(name, key)
        self._regions[(tenant, name)] = region

    def _open(self, name: str, key: str, object_name: str) -> int:
        try:
            fd = os.open(self._directory / object_name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _no_object(name, key) from None
        except PermissionError:
            raise FailedPrecondition(
                f"failed to register shared memory region '{name}': the gateway may not open shared memory "
                f"object '{key}' for reading and writing (permission denied)"
            ) from None
        except OSError as exc:
            raise InvalidArgument(
                f"failed to register shared memory region '{name}': cannot open shared memory object '{key}': "
                f"{exc.strerror}"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidArgument(
                f"failed to register shared memory region '{name}': '{key}' is not a shared memory object"
            )
        return fd

    def unregister(self, name: str) -> None:
        """Forget the caller's tenant's region ``name`` (all of them when ``name`` is empty).

        An unknown name (another tenant's region included) is no error. A region that requests
        in flight still use is unmapped when the last of them ends.
        """
        tenant = _tenant()
        self._forget([(tenant, name)] if name else [key for key in self._regions if key[0] == tenant])

    def _forget(self, names: list[tuple[str, str]]) -> None:
        for key in names:
            region = self._regions.pop(key, None)
            if region is not None:
                region.unregistered = True
                if region.users == 0:
                    region.close()

    def status(self, name: str) -> list[RegionStatus]:
        """Describe the caller's tenant's region ``name`` (all its regions when ``name`` is empty).

        With no name, a ``system`` tenant key (and the gateway without keys) gets every tenant's
        regions, other tenants' named ``<tenant>/<name>``.

        Raises:
            NotFound: The caller's tenant has no region of that name registered.
        """
        tenant = _tenant()
        if not name:
            sees_all = not auth.is_restricted()
            return [
                region.status if t == tenant else replace(region.status, name=f"{t}/{region.status.name}")
                for (t, _), region in self._regions.items()
                if t == tenant or sees_all
            ]
        region = self._regions.get((tenant, name))
        if region is None:
            raise NotFound(f"no system shared memory region '{name}' is registered on this gateway")
        return [region.status]

    def lease(self, use: ShmUse) -> ShmLease:
        """Check a request's regions and bounds and hold them until the lease is left (``with``).

        Raises:
            NotFound: A region is not registered on this gateway.
            InvalidArgument: An offset or offset + byte size beyond the region.
        """
        regions: dict[str, _Region] = {}
        if use:
            for ref in (*use.inputs, *use.outputs):
                if ref is not None:
                    regions[ref.region] = self._resolve(ref)
        for region in regions.values():
            region.users += 1
        return ShmLease(use, regions)

    def _resolve(self, ref: ShmRef) -> _Region:
        region = self._regions.get((_tenant(), ref.region))
        if region is None:
            raise NotFound(
                f"{ref.where}: shared memory region '{ref.region}' is not registered on this gateway "
                "(register it with SystemSharedMemoryRegister on the gateway you call)"
            )
        if ref.offset >= region.byte_size:
            raise InvalidArgument(
                f"{ref.where}: {OFFSET} {ref.offset} is out of range for shared memory region "
                f"'{ref.region}' of {region.byte_size} bytes"
            )
        if ref.offset + ref.byte_size > region.byte_size:
            raise InvalidArgument(
                f"{ref.where}: {OFFSET} {ref.offset} + {BYTE_SIZE} {ref.byte_size} is beyond the end of "
                f"shared memory region '{ref.region}' ({region.byte_size} bytes)"
            )
        return region

    def close(self) -> None:
        """Unmap every tenant's regions (on gateway stop, once no call is in flight)."""
        self._forget(list(self._regions))

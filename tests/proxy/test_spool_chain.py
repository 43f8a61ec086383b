"""A spool keeps the name of its hash chain: recorded when made, refused when changed.

Several proxies share one store with one chain each; a spool reopened under another name
would continue its entries in a chain that starts past seq 1, which no store can verify.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archive_api.store.chain import CheckpointSigner
from classifier.clock import ManualClock
from proxy.errors import SpoolCorrupt
from proxy.spool import Spool, iter_evidence, read_chain_name
from tests.proxy.test_spool import entry_payload


async def test_a_new_spool_records_its_chain_and_keeps_it(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=ManualClock(), chain_name="proxy-0") as spool:
        assert spool.chain_name == "proxy-0"
        await spool.append([entry_payload(1)])
    assert read_chain_name(directory) == "proxy-0"

    with pytest.raises(ValueError, match="holds chain 'proxy-0', not 'proxy-1'"):
        await Spool.open(directory, clock=ManualClock(), chain_name="proxy-1")
    # Refusing changed nothing: the spool opens under its own name, entries intact.
    async with await Spool.open(directory, clock=ManualClock(), chain_name="proxy-0") as spool:
        assert spool.head()[0] == 1
    assert read_chain_name(directory) == "proxy-0"


async def test_the_default_chain_is_spool(tmp_path: Path) -> None:
    async with await Spool.open(tmp_path / "spool", clock=ManualClock()) as spool:
        assert spool.chain_name == "spool"
    assert read_chain_name(tmp_path / "spool") == "spool"


async def test_a_spool_made_before_names_were_recorded_is_the_default_chain(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=ManualClock()) as spool:
        await spool.append([entry_payload(1), entry_payload(2)])
    (directory / "chain.json").unlink()  # as an older version left it
    assert read_chain_name(directory) is None

    with pytest.raises(ValueError, match="holds chain 'spool'"):
        await Spool.open(directory, clock=ManualClock(), chain_name="proxy-0")
    async with await Spool.open(directory, clock=ManualClock()) as spool:
        assert spool.head()[0] == 2
    assert read_chain_name(directory) == "spool"


async def test_an_empty_directory_takes_the_given_name(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    async with await Spool.open(directory, clock=ManualClock(), chain_name="proxy-3"):
        pass
    assert read_chain_name(directory) == "proxy-3"


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        b'{"chain": 5}',
        b'{"chain": ""}',
        b'{"name": "proxy-0"}',
        json.dumps({"chain": "x" * 129}).encode(),
        json.dumps({"chain": "proxy\x00-0"}).encode(),
        b"\xff\xfe",
    ],
)
async def test_a_damaged_chain_record_is_corruption(tmp_path: Path, content: bytes) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=ManualClock(), chain_name="proxy-0"):
        pass
    (directory / "chain.json").write_bytes(content)
    with pytest.raises(SpoolCorrupt):
        read_chain_name(directory)
    with pytest.raises(SpoolCorrupt):
        await Spool.open(directory, clock=ManualClock(), chain_name="proxy-0")


@pytest.mark.parametrize("name", ["", "x" * 129, "line\nbreak", "\x00"])
async def test_unusable_chain_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid chain name"):
        await Spool.open(tmp_path / "spool", clock=ManualClock(), chain_name=name)
    assert not (tmp_path / "spool").exists()


async def test_checkpoints_and_seals_carry_the_chain_name(tmp_path: Path) -> None:
    signer = CheckpointSigner.generate()
    evidence = tmp_path / "evidence"
    async with await Spool.open(
        tmp_path / "spool",
        clock=ManualClock(),
        signer=signer,
        checkpoint_every=2,
        segment_max_entries=2,
        keep_evidence=True,
        evidence_dir=evidence,
        chain_name="proxy-2",
    ) as spool:
        for n in range(1, 6):
            await spool.append([entry_payload(n)])
        await spool.commit_cursor(5)
        await spool.seal_indexed()
    sealed = list(iter_evidence(evidence, public_key=signer.public_key, chain_name="proxy-2"))
    assert [link.seq for link in sealed] == [1, 2, 3, 4]
    with pytest.raises(SpoolCorrupt, match="belongs to chain 'proxy-2'"):
        list(iter_evidence(evidence))  # the default chain's evidence it is not

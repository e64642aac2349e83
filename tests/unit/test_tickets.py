"""Tickets (encode, decode, tamper) and the join/leave proofs."""

import pytest

from appliance.errors import InvalidArgument
from appliance.sessions import ticket as tk


def _ticket() -> tk.Ticket:
    return tk.Ticket(
        producer_address="198.18.0.1:5000",
        producer_fingerprint="ab" * 32,
        session_id="0b5c3f9e-5b8f-4f4e-9d55-0d6f2b8a1c11",
        secret=tk.new_secret(),
        mode="quic",
        protocol="tcp",
    )


def test_ticket_round_trips() -> None:
    ticket = _ticket()
    assert tk.Ticket.decode(ticket.encode()) == ticket


def test_ticket_is_one_copy_pasteable_word() -> None:
    text = _ticket().encode()
    assert text.startswith("sst1.") and text.split() == [text]


def test_secret_is_at_least_256_bits() -> None:
    assert len(tk.new_secret()) * 8 >= 256


def test_ticket_surrounding_whitespace_is_ignored() -> None:
    ticket = _ticket()
    assert tk.Ticket.decode(f"  {ticket.encode()}\n") == ticket


@pytest.mark.parametrize("position", [6, 20, 40, -3])
def test_tampered_ticket_is_invalid_argument(position: int) -> None:
    text = _ticket().encode()
    flipped = "A" if text[position] != "A" else "B"
    with pytest.raises(InvalidArgument):
        tk.Ticket.decode(text[:position] + flipped + text[position + 1 :])


def test_truncated_ticket_is_invalid_argument() -> None:
    text = _ticket().encode()
    with pytest.raises(InvalidArgument):
        tk.Ticket.decode(text[: len(text) // 2])


@pytest.mark.parametrize("text", ["", "garbage", "sst1..", "sst2.abc.def"])
def test_garbage_ticket_is_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgument):
        tk.Ticket.decode(text)


def test_error_never_echoes_the_ticket() -> None:
    text = _ticket().encode()
    with pytest.raises(InvalidArgument) as info:
        tk.Ticket.decode(text[:-2])
    assert text[5:30] not in str(info.value)


def test_proof_verifies_with_the_same_secret_and_transcript() -> None:
    secret = tk.new_secret()
    proof = tk.mac(secret, tk.JOIN_LABEL, "s1", b"n1", b"n2")
    assert tk.verify(secret, proof, tk.JOIN_LABEL, "s1", b"n1", b"n2")


def test_proof_fails_with_another_secret_nonce_or_label() -> None:
    secret = tk.new_secret()
    proof = tk.mac(secret, tk.JOIN_LABEL, "s1", b"n1", b"n2")
    assert not tk.verify(tk.new_secret(), proof, tk.JOIN_LABEL, "s1", b"n1", b"n2")
    assert not tk.verify(secret, proof, tk.JOIN_LABEL, "s1", b"n1", b"n3")
    assert not tk.verify(secret, proof, tk.LEAVE_LABEL, "s1", b"n1", b"n2")


def test_transcript_fields_cannot_be_shifted() -> None:
    secret = tk.new_secret()
    assert tk.mac(secret, tk.JOIN_LABEL, "ab", "c") != tk.mac(secret, tk.JOIN_LABEL, "a", "bc")


def test_nonce_is_single_use() -> None:
    book = tk.NonceBook()
    nonce = book.issue("s1", now=0)
    assert book.consume("s1", nonce, now=1)
    assert not book.consume("s1", nonce, now=1)


def test_nonce_expires() -> None:
    book = tk.NonceBook(ttl=10)
    nonce = book.issue("s1", now=0)
    assert not book.consume("s1", nonce, now=11)


def test_nonce_is_bound_to_its_session() -> None:
    book = tk.NonceBook()
    nonce = book.issue("s1", now=0)
    assert not book.consume("s2", nonce, now=1)


def test_outstanding_nonces_per_session_are_bounded() -> None:
    book = tk.NonceBook(per_session=2)
    first = book.issue("s1", now=0)
    book.issue("s1", now=0)
    book.issue("s1", now=0)
    assert not book.consume("s1", first, now=1)

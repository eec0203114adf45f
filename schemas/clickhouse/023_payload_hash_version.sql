-- The worker's payload hash changed definition (v1: BLAKE2b of the decoded record's
-- text, computed in Python; v2: keyed SipHash-2-4 of the Avro body, computed by the
-- compiled decoder). Rows say which one they carry, so a copy of an event stored before
-- the change is still recognised as an exact duplicate, not a conflicting one.
ALTER TABLE usage_events
    ADD COLUMN IF NOT EXISTS payload_hash_version UInt8 DEFAULT 1
    COMMENT 'definition of payload_hash: 1 = BLAKE2b of the record text, 2 = keyed SipHash-2-4 of the Avro body'
    AFTER payload_hash;

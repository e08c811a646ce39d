-- Fronts cache the keys they look up (`server.key_cache_ms`, src/store/key_cache.rs). Any change
-- of a key — a revoke by `tollgate keys revoke`, or an operator's own UPDATE or DELETE in SQL —
-- is announced on `tollgate_keys` with the key's id, and every front drops the key at once.
CREATE FUNCTION tollgate.notify_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tollgate_keys', OLD.id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER api_keys_notify_change
    AFTER UPDATE OR DELETE ON tollgate.api_keys
    FOR EACH ROW EXECUTE FUNCTION tollgate.notify_key_change();

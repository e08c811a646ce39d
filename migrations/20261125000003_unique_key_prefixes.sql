-- Key prefixes long enough to name one key: `sk-tg-` and 8 hex digits (32 random bits), unique.
-- Keys created before this migration keep their 4-digit prefixes, which may collide; they are
-- left out of the index, and `keys revoke` refuses a prefix that names more than one live key.
CREATE UNIQUE INDEX api_keys_prefix ON tollgate.api_keys (key_prefix)
    WHERE length(key_prefix) >= 14;

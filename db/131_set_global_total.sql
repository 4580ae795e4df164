-- _set_global_total: INSTEAD OF UPDATE trigger that makes global_emissions report the new total.
-- It moves reconcile's slot by the difference, so the slots still sum to exactly what was set.
CREATE OR REPLACE FUNCTION bulk_sync._set_global_total()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = bulk_sync, pg_catalog, pg_temp
AS $$
BEGIN
    IF NEW.total_lbs_saved IS NULL THEN
        RAISE EXCEPTION 'global_emissions: total_lbs_saved must not be null' USING ERRCODE = 'BS001';
    END IF;
    -- Lock every slot so the difference is taken against a total no writer is moving.
    PERFORM FROM bulk_sync._global_slots ORDER BY slot FOR UPDATE;
    UPDATE bulk_sync._global_slots
       SET total_lbs = total_lbs + (NEW.total_lbs_saved - (SELECT sum(g.total_lbs) FROM bulk_sync._global_slots AS g)),
           last_updated = now()
     WHERE slot = 64;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER _100_set_global_total
    INSTEAD OF UPDATE ON bulk_sync.global_emissions
    FOR EACH ROW
    EXECUTE FUNCTION bulk_sync._set_global_total();

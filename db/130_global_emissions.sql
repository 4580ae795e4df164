-- global_emissions: the seed's one-row relation, as a view over the global slots.
-- SELECT total_lbs_saved FROM bulk_sync.global_emissions WHERE id = 1 is the exact current total.
CREATE OR REPLACE VIEW bulk_sync.global_emissions AS
SELECT 1::smallint AS id,
       coalesce(sum(g.total_lbs), 0)::numeric(30,6) AS total_lbs_saved,
       max(g.last_updated) AS last_updated
  FROM bulk_sync._global_slots AS g;
COMMENT ON VIEW bulk_sync.global_emissions IS
    'The exact global total (id = 1). An UPDATE of total_lbs_saved sets the reported total, as a drift simulation for reconcile.';

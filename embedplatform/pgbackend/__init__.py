"""PostgreSQL whose round trips cannot outlive their deadline (see embedplatform.faults)."""

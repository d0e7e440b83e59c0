"""Phases 1-2 over Flower: FedAvg (federate), the safe-pool collection (collect), the screening of every
client reply (validate) and the privacy modes (modes, dp)."""

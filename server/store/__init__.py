"""The run folder's stored state: artifacts (theta*, T', S) and the manifest that checks them and gates resume."""

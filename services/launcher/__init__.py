"""The launcher: starts, watches and stops the whole local mesh (`switchboard up|down`)."""

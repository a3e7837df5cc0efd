"""The serving side: ``protocol`` (the one definition of the served contract) and ``client`` (the SDK)."""

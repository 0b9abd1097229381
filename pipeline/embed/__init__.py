"""The embed job: list -> decode -> encode -> write on Ray Data, then index -> publish (see ``job``)."""

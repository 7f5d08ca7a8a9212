"""Carrying a persona from one model to another, by any method: ``carry.carry_persona``, the one
place a method is chosen, with the generated method beside it (it drives both models); the maps'
arithmetic and the other methods (``maps.py``); the calibration of a carried persona's scale on the
target (``strength_calibration.py``). The server's map request and the evaluation's transfer table
both carry through ``carry_persona``, so the table measures exactly what the server stores. The
pure maths of maps (ridge, Procrustes, adapters, norm calibration) is ``server.steering.mapping``."""

"""Carrying a persona from one model to another, by any method: the one place a method is chosen
(``carry.py``), the maps' arithmetic (``maps.py``), the generated method (``generated.py``) and the
calibration of a carried persona's strength on the target (``strength_calibration.py``). The
server's map request and the evaluation's transfer table both carry through ``carry.carry_persona``,
so the table measures exactly what the server stores."""

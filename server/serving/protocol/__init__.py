"""The OpenAI wire protocol of chat and text completions, in one place: ``requests`` (the bodies, which
turn themselves into the engine's sampling parameters and the serving layer's job), ``responses``
(the objects and their SSE framing) and ``json_types`` (the scalar types the bodies share with the
admin API's). It sits in serving, below the API, because the serving layer writes the responses."""

//! Progress from sd-scripts' output: its tqdm bar `steps:  25%|██▌   | 1/4 [00:03<00:09,
//! 3.05s/it, avr_loss=0.0634]`, redrawn with `\r`. `avr_loss` is kohya's moving average of
//! the step losses over one epoch (the step's own loss when an epoch is one step).

/// One redraw of the bar: steps done in this attempt, the bar's total, and `avr_loss`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Bar {
    pub done: u64,
    pub total: u64,
    pub avr_loss: Option<f64>,
}

/// Parses one `\r`- or `\n`-separated segment of the output; `None` when it is not the bar.
pub(crate) fn parse_bar(segment: &str) -> Option<Bar> {
    let rest = segment.trim_start().strip_prefix("steps:")?;
    let (_, after_bar) = rest.rsplit_once('|')?;
    let counts = after_bar.split_whitespace().next()?;
    let (done, total) = counts.split_once('/')?;
    let avr_loss = after_bar
        .split_once("avr_loss=")
        .and_then(|(_, v)| v.split([']', ',']).next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite());
    Some(Bar {
        done: done.parse().ok()?,
        total: total.parse().ok()?,
        avr_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_and_other_lines() {
        let cases = [
            (
                "steps:  25%|██▌       | 1/4 [00:03<00:09,  3.05s/it, avr_loss=0.0634]",
                Some(Bar {
                    done: 1,
                    total: 4,
                    avr_loss: Some(0.0634),
                }),
            ),
            (
                "steps:   0%|          | 0/400 [00:00<?, ?it/s]",
                Some(Bar {
                    done: 0,
                    total: 400,
                    avr_loss: None,
                }),
            ),
            (
                "steps: 100%|██████████| 8/8 [00:20<00:00,  2.5s/it, avr_loss=nan]",
                Some(Bar {
                    done: 8,
                    total: 8,
                    avr_loss: None,
                }),
            ),
            (
                "steps:  50%|█████     | 2/4 [00:05<00:05, avr_loss=1e-3, lr=2]",
                Some(Bar {
                    done: 2,
                    total: 4,
                    avr_loss: Some(1e-3),
                }),
            ),
            ("epoch 1/4", None),
            ("INFO     saving state at step 4", None),
            ("steps: broken", None),
        ];
        for (line, want) in cases {
            assert_eq!(parse_bar(line), want, "{line}");
        }
    }
}
